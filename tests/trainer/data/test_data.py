"""trainer.data: loading every format, bad-row reports, toy-arith, prompt building, and the resumable stream."""

from __future__ import annotations

import ast
import json
import re
import warnings

import pytest

from trainer.data import (
    TEMPLATES,
    DataWarning,
    Example,
    FieldMap,
    Prompt,
    PromptStream,
    build_prompts,
    fingerprint,
    format_prompt,
    load_examples,
    toy_arith,
)
from trainer.fsutil import UserError

CUSTOM = FieldMap(question="q", answer="a", id="uid", source="src")
ROWS = [
    {"q": "What is 3 + 4?", "a": 7, "uid": "x-1", "src": "gsm8k"},
    {"q": "Name the capital of France.", "a": "Paris", "uid": 2, "src": "trivia"},
    {"q": "Half of 5?", "a": 2.5, "extra": [1, 2]},  # no uid/src: defaults apply
]


def expected_examples(name: str) -> list[Example]:
    return [
        Example("What is 3 + 4?", "7", "x-1", "gsm8k"),
        Example("Name the capital of France.", "Paris", "2", "trivia"),
        Example("Half of 5?", "2.5", f"{name}:2", name),
    ]


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------ formats


def test_jsonl_round_trip_with_custom_fields(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n   \n" + json.dumps(ROWS[2]) + "\n")
    assert load_examples(path, fields=CUSTOM) == expected_examples("mix")


def test_jsonl_lines_end_only_at_newline(tmp_path):
    # U+2028 is a line break to str.splitlines but legal raw inside a JSON string; \r\n endings are fine too
    path = tmp_path / "u.jsonl"
    rows = [{"question": "one\u2028two?", "answer": "x"}, {"question": "three?", "answer": "y"}]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert [e.question for e in load_examples(path)] == ["one\u2028two?", "three?"]


def test_json_list_round_trip(tmp_path):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert load_examples(str(path), fields=CUSTOM) == expected_examples("mix")


def test_json_file_holding_json_lines_is_read_as_such(tmp_path):
    # datasets' to_json writes JSON Lines into a .json file
    path = tmp_path / "mix.json"
    write_jsonl(path, ROWS)
    assert load_examples(path, fields=CUSTOM) == expected_examples("mix")


def test_parquet_round_trip_keeps_int_answers(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "q": ["What is 3 + 4?", "What is 10 - 1?", "Twice 21?"],
            "a": pa.array([7, 9, None], type=pa.int64()),  # the null makes pandas turn 7 into 7.0
            "uid": ["a", None, "c"],
            "src": ["s1", "s2", None],
            "solution": ["long text", "long text", "long text"],
        }
    )
    path = tmp_path / "ints.parquet"
    pq.write_table(table, path)
    with pytest.warns(DataWarning, match=re.escape(f"{path}[2]: field 'a' must be a string or a number, got null")):
        examples = load_examples(path, fields=CUSTOM)
    assert examples == [Example("What is 3 + 4?", "7", "a", "s1"), Example("What is 10 - 1?", "9", "ints:1", "s2")]


def test_integral_float_answers_are_written_as_ints(tmp_path):
    path = tmp_path / "f.jsonl"
    write_jsonl(path, [{"question": "a?", "answer": 7.0}, {"question": "b?", "answer": -0.5}])
    assert [e.answer for e in load_examples(path)] == ["7", "-0.5"]


def test_datasets_folder_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    rows = [
        {"q": "What is 3 + 4?", "a": 7, "uid": "x-1", "src": "gsm8k"},
        {"q": "What is 6 * 7?", "a": 42, "uid": None, "src": None},  # null id/source: defaults apply
    ]
    datasets.Dataset.from_list(rows).save_to_disk(folder)
    assert load_examples(folder, fields=CUSTOM) == [
        Example("What is 3 + 4?", "7", "x-1", "gsm8k"),
        Example("What is 6 * 7?", "42", "saved:1", "saved"),
    ]


def test_dataset_dict_folder_picks_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list([{"problem": "What is 1 + 1?", "answer": "2"}])
    test = datasets.Dataset.from_list([{"problem": "What is 2 + 2?", "answer": 4}, {"problem": "3 + 3?", "answer": 6}])
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(folder)

    assert load_examples(folder) == [Example("What is 1 + 1?", "2", "dd:0", "dd")]
    assert [e.answer for e in load_examples(folder, split="test")] == ["4", "6"]
    with pytest.raises(UserError, match=r"no split 'validation'; available splits: train, test"):
        load_examples(folder, split="validation")


def test_datasets_rows_are_located_by_split_and_index(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "ok?", "answer": "1"}, {"question": "", "answer": "2"}]
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(folder)
    with pytest.raises(UserError, match=re.escape(f"{folder}:train[1]: field 'question' is empty")):
        load_examples(folder, on_bad_row="error")


def test_question_field_falls_back_only_when_not_set(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"problem": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 1 + 2?", "answer": 3}])
    assert [e.question for e in load_examples(path)] == ["What is 2 + 2?", "What is 1 + 2?"]
    with pytest.raises(UserError, match=re.escape(f"{path}:1: missing field 'question' (and 1 more")):
        load_examples(path, fields=FieldMap(question="question"), on_bad_row="error")


def test_limit_keeps_a_prefix_of_the_valid_examples(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"question": f"q{i}?", "answer": i} for i in range(10)])
    assert [e.id for e in load_examples(path, limit=3)] == ["d:0", "d:1", "d:2"]
    assert len(load_examples("builtin:toy-arith?size=50", limit=7)) == 7
    with pytest.raises(ValueError, match="limit"):
        load_examples(path, limit=0)


def test_field_map_rejects_empty_names():
    with pytest.raises(ValueError, match="FieldMap.answer"):
        FieldMap(answer="")


# ------------------------------------------------------------------------------------------ bad rows

BAD_ROWS = [
    ('["a list"]', "row is not an object (got list)"),
    ('"just text"', "row is not an object (got string)"),
    ('{"question": "q?"}', "missing field 'answer'"),
    ('{"answer": "1"}', "missing field 'question' (also tried 'problem', 'prompt')"),
    ('{"question": 12, "answer": "1"}', "field 'question' must be a string, got number"),
    ('{"question": "", "answer": "1"}', "field 'question' is empty"),
    ('{"question": "  \\n ", "answer": "1"}', "field 'question' is empty"),
    ('{"question": "q?", "answer": ["1"]}', "field 'answer' must be a string or a number, got list"),
    ('{"question": "q?", "answer": true}', "field 'answer' must be a string or a number, got boolean"),
    ('{"question": "q?", "answer": null}', "field 'answer' must be a string or a number, got null"),
    ('{"question": "q?", "answer": " "}', "field 'answer' is empty"),
    ('{"question": "q?", "answer": NaN}', "field 'answer' is nan"),
    ('{"question": "q?", "answer": "1", "id": 1.5}', "field 'id' must be a string or an integer, got number"),
    ('{"question": "q?", "answer": "1", "source": 3}', "field 'source' must be a string, got number"),
    ('{"question": "q?", "answer": "1", "id": "first"}', "duplicate id 'first' (first at {path}:1)"),
    ('{"question": "q?", "answer": ', "invalid JSON (Expecting value at column 30)"),
]


@pytest.mark.parametrize(("line", "message"), BAD_ROWS, ids=[m.split(" (")[0] for _, m in BAD_ROWS])
def test_each_kind_of_bad_row_is_reported_with_its_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    good = '{"question": "What is 1 + 1?", "answer": 2, "id": "first"}'
    path.write_text(f"{good}\n\n{line}\n")  # the bad row is on line 3: blank lines count as lines
    fields = FieldMap(id="id", source="source")
    where = f"{path}:3: {message.format(path=path)}"

    with pytest.raises(UserError, match=re.escape(where)):
        load_examples(path, fields=fields, on_bad_row="error")
    with pytest.warns(DataWarning, match=re.escape(f"skipped 1 of 2 rows of {path}: {where}")):
        assert [e.id for e in load_examples(path, fields=fields)] == ["first"]


def test_bad_rows_in_a_json_list_are_located_by_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": "ok?", "answer": 1}, {"question": "no answer"}]))
    with pytest.raises(UserError, match=re.escape(f"{path}[1]: missing field 'answer'")):
        load_examples(path, on_bad_row="error")


def test_skip_warning_counts_all_and_quotes_the_first_five(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"question": "ok?", "answer": 1}] + [{"question": f"q{i}?"} for i in range(8)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(load_examples(path)) == 1
    [warning] = caught
    text = str(warning.message)
    assert warning.category is DataWarning
    assert text.startswith(f"skipped 8 of 9 rows of {path}: {path}:2: missing field 'answer'")
    assert f"{path}:6:" in text and f"{path}:7:" not in text and text.endswith("; and 3 more")


def test_error_mode_names_the_first_bad_row_and_counts_the_rest(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"question": "ok?", "answer": 1}, "{oops", {"answer": 2}])
    with pytest.raises(UserError, match=re.escape(f"{path}:2: invalid JSON") + r".*\(and 1 more bad rows\)"):
        load_examples(path, on_bad_row="error")


def test_on_bad_row_must_be_skip_or_error(tmp_path):
    with pytest.raises(ValueError, match="on_bad_row must be one of 'skip', 'error', got 'ignore'"):
        load_examples(tmp_path / "whatever.jsonl", on_bad_row="ignore")


def test_missing_unknown_and_empty_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"data set {tmp_path / 'nope.jsonl'} not found; expected a .jsonl")):
        load_examples(tmp_path / "nope.jsonl")

    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(UserError, match=re.escape(f"cannot read {csv}: unknown file type '.csv'; expected")):
        load_examples(csv)

    with pytest.raises(UserError, match=re.escape(f"{tmp_path} is a folder but not a datasets folder")):
        load_examples(tmp_path)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match=re.escape(f"{empty} has no rows")):
        load_examples(empty)

    all_bad = tmp_path / "bad.jsonl"
    write_jsonl(all_bad, [{"question": "q?"}, {"question": "r?"}])
    with pytest.warns(DataWarning), pytest.raises(UserError, match=re.escape(f"{all_bad} has no usable examples")):
        load_examples(all_bad)


def test_a_json_file_must_hold_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"question": "q?", "answer": 1}')
    with pytest.raises(UserError, match="holds a JSON dict; expected a list of objects"):
        load_examples(path)
    path.write_text('[{"question": "q?",')
    with pytest.raises(UserError, match=re.escape(f"{path}:1: invalid JSON")):
        load_examples(path)


# ------------------------------------------------------------------------------------------ toy-arith


def evaluate(expression: str) -> int:
    """An independent oracle: Python's own parser and precedence, integers and + - * only."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = walk(node.left), walk(node.right)
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
        raise AssertionError(f"unexpected syntax {ast.dump(node)} in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def parse_question(question: str) -> tuple[list[int], list[str]]:
    match = re.fullmatch(r"What is (.+)\?", question)
    assert match, question
    tokens = match.group(1).split(" ")
    return [int(t) for t in tokens[::2]], tokens[1::2]


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5, 6, 9])
def test_toy_arith_answers_are_correct(difficulty):
    examples = toy_arith(size=300, difficulty=difficulty, seed=11)
    assert len(examples) == 300 and len({e.id for e in examples}) == 300
    for i, example in enumerate(examples):
        expression = re.fullmatch(r"What is (.+)\?", example.question).group(1)
        assert example.answer == str(evaluate(expression)), example
        assert (example.id, example.source) == (f"toy-arith:{difficulty}:{i}", "toy-arith")


def digits(n: int) -> int:
    return len(str(abs(n)))


def test_toy_arith_forms_per_difficulty():
    for example in toy_arith(size=200, difficulty=1):
        operands, ops = parse_question(example.question)
        assert ops == ["+"] and all(1 <= v <= 9 for v in operands)
    forms = set()
    for example in toy_arith(size=200, difficulty=2):
        operands, ops = parse_question(example.question)
        forms.add(ops[0])
        assert ops[0] in "+-" and all(digits(v) == 2 for v in operands) and int(example.answer) >= 0
    assert forms == {"+", "-"}
    for example in toy_arith(size=200, difficulty=3):
        (a, b), ops = parse_question(example.question)
        assert ops == ["*"] and digits(a) == 2 and 2 <= b <= 9
    for difficulty, width in [(4, 2), (5, 2), (6, 3), (8, 4)]:
        for example in toy_arith(size=100, difficulty=difficulty):
            operands, ops = parse_question(example.question)
            assert len(operands) == difficulty - 1 and set(ops) <= {"+", "-", "*"}
            for op, value in zip(["+", *ops], operands):
                assert (2 <= value <= 9) if op == "*" else digits(value) == width


def test_toy_arith_is_deterministic_by_seed_and_leaves_global_random_alone():
    import random

    random.seed(123)
    before = random.random()
    random.seed(123)
    first = toy_arith(size=100, difficulty=2, seed=5)
    assert random.random() == before
    assert toy_arith(size=100, difficulty=2, seed=5) == first
    other = toy_arith(size=100, difficulty=2, seed=6)
    assert [e.question for e in other] != [e.question for e in first]


def test_toy_arith_difficulty_range_is_an_even_mix():
    examples = toy_arith(size=9, difficulty="1-3")
    assert [e.id.split(":")[1] for e in examples] == ["1", "2", "3"] * 3
    assert [len(parse_question(e.question)[0]) for e in toy_arith(size=4, difficulty=(3, 4))] == [2, 3, 2, 3]


def test_builtin_spec_parameters(tmp_path):
    assert load_examples("builtin:toy-arith", seed=4) == toy_arith(seed=4)
    spec = "builtin:toy-arith?difficulty=2-3&size=12&seed=9"
    assert load_examples(spec, seed=1) == toy_arith(size=12, difficulty="2-3", seed=9)  # the spec's seed wins
    for bad, message in [
        ("builtin:toy-arith?size=ten", "expected an integer, got 'ten'"),
        ("builtin:toy-arith?size=0", "size must be a positive integer"),
        ("builtin:toy-arith?difficulty=3-1", "difficulty must be >= 1"),
        ("builtin:toy-arith?difficulty=0", "difficulty must be >= 1"),
        ("builtin:toy-arith?colour=red", "unknown parameter 'colour'.*takes: size, difficulty, seed"),
        ("builtin:toy-arith?size=1&size=2", "parameter 'size' is given twice"),
        ("builtin:toy-arith?size", "cannot parse the parameters"),
        ("builtin:gsm8k", "unknown builtin data set 'gsm8k'.*available: toy-arith"),
    ]:
        with pytest.raises(UserError, match=message):
            load_examples(bad)


def test_toy_arith_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        toy_arith(size=-1)
    with pytest.raises(ValueError, match="difficulty"):
        toy_arith(difficulty="hard")


# ------------------------------------------------------------------------------------------ prompts

R1_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def test_templates():
    assert set(TEMPLATES) == {"r1", "plain"}
    assert format_prompt("What is {x}?", "r1") == "What is {x}?" + R1_SUFFIX
    assert format_prompt("What is {x}?", "plain") == "What is {x}?"
    with pytest.raises(ValueError, match="unknown prompt template 'cot'; choose one of: r1, plain"):
        format_prompt("q", "cot")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_build_prompts_applies_the_chat_template(tokenizer):
    examples = toy_arith(size=3)
    prompts = build_prompts(tokenizer, examples)
    assert [p.example for p in prompts] == examples
    for prompt in prompts:
        assert isinstance(prompt, Prompt) and all(type(t) is int for t in prompt.token_ids)
        text = tokenizer.decode(prompt.token_ids)
        assert f"<|im_start|>user\n{prompt.example.question}{R1_SUFFIX}<|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n")


def test_build_prompts_plain_text_uses_the_tokenizers_own_encoding(tokenizer):
    [example] = toy_arith(size=1)
    [prompt] = build_prompts(tokenizer, [example], template="plain", chat=False)
    assert prompt.token_ids == tokenizer(example.question)["input_ids"]
    assert tokenizer.decode(prompt.token_ids) == example.question


def test_build_prompts_drops_prompts_over_the_limit(tokenizer):
    short = Example("What is 1 + 1?", "2", "short", "t")
    long = Example("What is " + " + ".join(["1"] * 50) + "?", "50", "long", "t")
    sizes = {p.example.id: len(p.token_ids) for p in build_prompts(tokenizer, [short, long])}
    limit = sizes["short"]
    with pytest.warns(DataWarning, match=rf"dropped 1 of 2 prompts longer than max_prompt_tokens={limit} .*ids: long"):
        kept = build_prompts(tokenizer, [short, long], max_prompt_tokens=limit)
    assert [p.example.id for p in kept] == ["short"]
    with pytest.raises(UserError, match="all 2 prompts are longer than max_prompt_tokens=3"):
        build_prompts(tokenizer, [short, long], max_prompt_tokens=3)


def test_build_prompts_needs_a_chat_template_for_chat(tiny_llama_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template; set chat=False"):
        build_prompts(bare, toy_arith(size=1))
    assert len(build_prompts(bare, toy_arith(size=1), chat=False)) == 1


# ------------------------------------------------------------------------------------------ PromptStream


def ids(examples) -> list[str]:
    return [e.id for e in examples]


def test_stream_covers_every_example_once_per_epoch_in_new_orders():
    examples = toy_arith(size=50)
    stream = PromptStream(examples, seed=3)
    epochs = [ids(stream.take(50)) for _ in range(3)]
    assert all(sorted(epoch) == sorted(ids(examples)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3 and epochs[0] != ids(examples)
    assert (stream.epoch, stream.position) == (3, 0)
    assert ids(PromptStream(examples, seed=4).take(50)) != epochs[0]


def test_stream_take_crosses_epoch_boundaries():
    examples = toy_arith(size=7)
    reference = PromptStream(examples, seed=1)
    flat = ids(reference.take(7)) + ids(reference.take(7)) + ids(reference.take(7))
    stream = PromptStream(examples, seed=1)
    chunks = [stream.take(k) for k in (3, 5, 0, 9, 1)]
    assert ids(e for chunk in chunks for e in chunk) == flat[:18]
    assert (stream.epoch, stream.position) == (2, 4)
    assert next(stream).id == flat[18]


def test_stream_without_shuffle_keeps_the_source_order():
    examples = toy_arith(size=4)
    assert ids(PromptStream(examples, seed=0, shuffle=False).take(6)) == ids(examples + examples[:2])


def test_stream_state_dict_round_trip_continues_identically():
    examples = toy_arith(size=13, difficulty="1-2")
    original = PromptStream(examples, seed=42)
    original.take(20)
    state = json.loads(json.dumps(original.state_dict()))
    assert state["fingerprint"] == fingerprint(examples) and state["num_examples"] == 13
    resumed = PromptStream(list(examples), seed=0)  # the saved seed replaces the constructor's
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (1, 7)
    assert ids(resumed.take(30)) == ids(original.take(30))


def test_stream_refuses_a_cursor_of_another_data_set():
    stream = PromptStream(toy_arith(size=10, seed=0), seed=0)
    state = stream.state_dict()
    for other in (toy_arith(size=10, seed=1), toy_arith(size=11, seed=0), toy_arith(size=10, seed=0)[::-1]):
        with pytest.raises(UserError, match="saved for another data set"):
            PromptStream(other, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="'position' is missing"):
        stream.load_state_dict({k: v for k, v in state.items() if k != "position"})
    with pytest.raises(UserError, match="damaged: epoch 0, position 10"):
        stream.load_state_dict(dict(state, position=10))


def test_stream_argument_errors():
    with pytest.raises(ValueError, match="at least one example"):
        PromptStream([], seed=0)
    with pytest.raises(ValueError, match="k >= 0"):
        PromptStream(toy_arith(size=2), seed=0).take(-1)


def test_stream_order_is_a_fixed_function_of_seed_and_epoch():
    # Pinned so that a change to the permutation (which would break resuming old checkpoints) is noticed.
    stream = PromptStream(toy_arith(size=5), seed=0)
    assert [e.id.rsplit(":", 1)[1] for e in stream.take(10)] == list("3014231240")
    assert sum(int(e.answer) for e in toy_arith(size=100, seed=0)) == 1040


# ------------------------------------------------------------------------------------------ oversized rows

_HUGE_ROW_CHILD = r"""
import json, resource, sys, warnings
sys.path.insert(0, sys.argv[1])
from cpu_memory import peak_growth, proc_status_bytes
from transformers import AutoTokenizer
from trainer.data import build_prompts, load_examples, toy_arith

tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
build_prompts(tokenizer, toy_arith(size=8), max_prompt_tokens=256)  # warm-up: thread pools, template compilation
# A cap on the address space, so that a regression fails here quickly instead of taking the machine's memory
# (tokenising the huge row whole needs several GiB).
cap = proc_status_bytes("VmSize") + (3 << 30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
result = {}

def load_and_build():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts = build_prompts(tokenizer, load_examples(sys.argv[3]), max_prompt_tokens=256)
    result["ids"] = [p.example.id for p in prompts]
    result["warnings"] = [str(w.message) for w in caught]

result["peak_bytes"] = peak_growth(load_and_build)
print(json.dumps(result))
"""


def _data_with_a_huge_row(path, huge_chars: int) -> None:
    """20 ordinary rows, then (line 21) one question of ``huge_chars`` characters of ordinary words."""
    rows = [{"question": f"What is {i} + {i}?", "answer": 2 * i} for i in range(20)]
    words = "What is 12 + 34 and then 56 + 78? "
    rows.append({"question": (words * (huge_chars // len(words) + 1))[:huge_chars], "answer": 1})
    write_jsonl(path, rows)


def test_a_huge_row_is_dropped_and_reported_without_being_tokenised_in_bounded_memory(tmp_path, tiny_llama_dir):
    """A 24 MiB question among 20 short ones: loading and building the prompts must cost a few copies of the row
    (reading it: the line, its text, the parsed question), never its tokens (tokenised whole, a 5 MB question
    took 2 GB), and the row is dropped with its file and line in the warning."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "big.jsonl"
    row = 24 << 20
    _data_with_a_huge_row(path, row)
    bench = Path(__file__).parents[3] / "bench"
    out = subprocess.run(
        [sys.executable, "-c", _HUGE_ROW_CHILD, str(bench), str(tiny_llama_dir), str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ids"] == [f"big:{i}" for i in range(20)]
    [warning] = result["warnings"]
    assert "dropped 1 of 21 prompts longer than max_prompt_tokens=256" in warning and f"{path}:21" in warning
    assert result["peak_bytes"] < 6 * row, result["peak_bytes"] / row


class _RecordingTokenizer:
    """The tiny model's tokenizer, recording the length of every text it is asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer, self.lengths = tokenizer, []

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, conversations, **kwargs):
        self.lengths += [len(c[0]["content"]) for c in conversations]
        return self._tokenizer.apply_chat_template(conversations, **kwargs)


def test_an_oversized_row_is_never_tokenised_and_follows_on_bad_row(tmp_path, tokenizer):
    path = tmp_path / "big.jsonl"
    _data_with_a_huge_row(path, 1 << 20)
    recording = _RecordingTokenizer(tokenizer)
    with pytest.warns(DataWarning, match=re.escape("dropped 1 of 21 prompts longer than max_prompt_tokens=64")):
        prompts = build_prompts(recording, load_examples(path), max_prompt_tokens=64)
    assert [p.example.id for p in prompts] == [f"big:{i}" for i in range(20)]
    assert max(recording.lengths) < 1000  # the short rows only: the long one was measured in characters
    with pytest.raises(UserError, match=re.escape(f"{path}:21: the prompt is longer than max_prompt_tokens=64")):
        build_prompts(tokenizer, load_examples(path), max_prompt_tokens=64, on_bad_row="error")


def test_prompts_over_the_token_limit_are_located_by_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"question": "What is 1 + 1?", "answer": 2}, {"question": "1 + " * 40 + "1?", "answer": 41}])
    limit = len(build_prompts(tokenizer, load_examples(path))[0].token_ids)
    with pytest.warns(DataWarning, match=re.escape(f"ids: d:1 at {path}:2")):
        assert len(build_prompts(tokenizer, load_examples(path), max_prompt_tokens=limit)) == 1
    with pytest.raises(UserError, match=re.escape(f"{path}:2: the prompt is longer than max_prompt_tokens={limit}")):
        build_prompts(tokenizer, load_examples(path), max_prompt_tokens=limit, on_bad_row="error")
