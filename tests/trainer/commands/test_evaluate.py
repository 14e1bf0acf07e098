"""dler eval: the metrics against brute force, budget forcing, benchmark loaders, the results files, bad input."""

import itertools
import json
import math
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.commands.benchmarks import benchmark_record, load_benchmark, load_benchmarks, parse_spec
from trainer.commands.eval_metrics import default_ks, majority_vote, pass_at_k, summarise
from trainer.commands.eval_report import results_markdown
from trainer.fsutil import UserError
from trainer.rollout.budget_forcing import Response, ThinkBudget, generate
from trainer.rollout.contract import Sample

FIXTURES = Path(__file__).parents[2] / "fixtures" / "benchmarks"


# ------------------------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_stays_exact_for_large_n():
    # 1 - C(n-c, k)/C(n, k) in exact rationals: the product form must not lose it to cancellation.
    n, c, k = 1024, 3, 16
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(n, 0, k) == 0.0 and pass_at_k(n, n, 1) == 1.0


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)


def test_default_ks_are_powers_of_two_and_the_sample_count():
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(12) == [1, 2, 4, 8, 12]
    assert default_ks(1) == [1]


def test_majority_vote():
    assert majority_vote(["7", "7", "8"], [1, 1, 0]) == 1.0
    assert majority_vote(["8", "7", "8"], [0, 1, 0]) == 0.0
    assert majority_vote(["8", "7", " 7", "8"], [0, 1, 1, 0]) == 0.0  # tie: the answer seen first
    assert majority_vote([None, None, "7"], [0, 0, 1]) == 1.0  # no answer, no vote
    assert majority_vote([None, None], [0, 0]) == 0.0


def _groups(correct, lengths, finish):
    return [
        [{"text": "", "tokens": n, "finish_reason": f, "think_tokens": None, "forced": False} for n, f in zip(ln, fs)]
        for ln, fs in zip(lengths, finish)
    ]


def test_summarise_numbers_are_consistent():
    correct = [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    lengths = [[10, 20, 30, 40], [50, 60, 70, 80], [5, 5, 5, 5]]
    finish = [["stop"] * 4, ["stop", "length", "length", "stop"], ["stop"] * 4]
    answers = [["1", "2", "1", "1"], ["3", "3", "4", None], ["9"] * 4]
    m = summarise(_groups(correct, lengths, finish), correct, answers, [1, 2, 4], seconds=2.0)
    assert m["questions"] == 3 and m["samples_per_question"] == 4
    assert m["pass@1"] == pytest.approx(7 / 12)
    assert m["pass@k"]["1"] == pytest.approx(m["pass@1"])
    assert m["pass@k"]["2"] == pytest.approx((pass_at_k(4, 3, 2) + 0 + 1) / 3)
    assert m["pass@k"]["4"] == pytest.approx(2 / 3)
    assert m["majority"] == pytest.approx(2 / 3)
    assert m["mean_length"] == pytest.approx(sum(map(sum, lengths)) / 12)
    assert m["truncation_rate"] == pytest.approx(2 / 12)
    assert m["tokens_per_second"] == pytest.approx(sum(map(sum, lengths)) / 2.0, abs=0.1)


# ----------------------------------------------------------------------------------------- budget forcing


class _CharTokenizer:
    """One token per character: token counts are character counts."""

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [ord(ch) for ch in text]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class _ScriptedEngine:
    """Continues each prompt with a fixed script (chosen by the prompt's first character), honouring
    max_tokens and stop strings like a real engine."""

    def __init__(self, scripts):
        self.scripts, self.calls = scripts, []

    def generate(self, prompts, *, n=1, max_tokens=16, temperature=1.0, top_p=1.0, seed=None, stop=None):
        self.calls.append(dict(n=n, max_tokens=max_tokens, stop=stop, prompts=len(prompts)))
        groups = []
        for p in prompts:
            text = "".join(chr(i) for i in p)
            script, done = self.scripts[text[0]], text[2:]  # prompt: script key, "|", what was generated
            # Continue the script after what was generated; after a forced close, with the script's answer.
            rest = script[len(done) :] if script.startswith(done) else script.split("</think>")[-1]
            full = rest + "\0"  # \0 plays EOS
            out, reason = "", "length"
            for ch in full[:max_tokens]:
                if ch == "\0":
                    reason = "stop"
                    break
                out += ch
                if stop and any(out.endswith(s) for s in stop):
                    reason = "stop"
                    break
            ids = [ord(ch) for ch in out]
            groups.append([Sample(ids, out, reason, [0.0] * len(ids)) for _ in range(n)])
        return groups


def test_budget_forcing_cuts_thinking_at_the_budget_and_appends_the_cue():
    tok = _CharTokenizer()
    scripts = {
        "a": "x" * 50 + "</think>the answer is 7",  # thinks too long: forced
        "b": "yy</think>short answer",  # closes its thinking in time: answers normally
        "c": "no thinking at all",  # ends without ever closing: complete as it is
    }
    engine = _ScriptedEngine(scripts)
    think = ThinkBudget(tokens=20, answer_tokens=5, cue=" ANS:")
    prompts = [[ord("a"), ord("|")], [ord("b"), ord("|")], [ord("c"), ord("|")]]
    out = generate(engine, tok, prompts, n=2, max_tokens=100, temperature=0.6, top_p=0.95, seed=0, think=think)
    a, b, c = (group[0] for group in out)
    assert engine.calls[0]["max_tokens"] == 20 and engine.calls[0]["stop"] == ["</think>"]
    assert a.forced and a.think_tokens == 20 and a.text.startswith("x" * 20 + "\n</think> ANS:")
    assert a.tokens == 20 + len("\n</think> ANS:") + 5 and a.finish_reason == "length"  # answer budget used up
    assert not b.forced and b.think_tokens == len("yy</think>") and b.text.startswith("yy</think>")
    assert not c.forced and c.text == "no thinking at all" and c.finish_reason == "stop"
    for group in out:
        for r in group:
            thinking = r.text.split("</think>")[0]
            assert len(thinking) <= 20 + 1  # the budget, plus the newline the forced close starts with
            assert r.think_tokens <= 20


def test_budget_forcing_needs_room_for_an_answer():
    with pytest.raises(ValueError, match="below max_tokens"):
        generate(_ScriptedEngine({}), _CharTokenizer(), [[1]], n=1, max_tokens=10, temperature=1, top_p=1, seed=0,
                 think=ThinkBudget(10))  # fmt: skip
    with pytest.raises(ValueError, match="think budget"):
        ThinkBudget(0)


def test_without_a_budget_generation_is_one_plain_call():
    engine = _ScriptedEngine({"c": "hello"})
    out = generate(engine, _CharTokenizer(), [[ord("c"), ord("|")]], n=3, max_tokens=4, temperature=1, top_p=1, seed=0)
    assert [r.text for r in out[0]] == ["hell"] * 3 and out[0][0] == Response("hell", 4, "length")
    assert len(engine.calls) == 1 and engine.calls[0]["stop"] is None


# --------------------------------------------------------------------------------------------- loaders


@pytest.mark.parametrize(
    "file,first",
    [
        ("math500.jsonl", ("test/prealgebra/1.json", "What is $3 + 4$?", "7")),
        ("aime24.jsonl", ("60", "Find the remainder when $2^{10}$ is divided by $1000$.", "24")),
        ("aime24_upper.parquet", ("2024-I-1", "What is $5 \\times 5$?", "25")),
        ("amc.jsonl", ("0", "What is $1 + 2 + \\cdots + 10$?", "55")),  # 55.0 in the file
        ("minerva.jsonl", ("0", "A car travels $30$ km in $0.5$ hours. What is its speed in km/h?", "60")),
        ("olympiadbench.jsonl", ("1606", "Find the smallest prime greater than $20$.", "$23$")),
    ],
)
def test_benchmark_files_load_with_their_own_field_names(file, first):
    bench = load_benchmark(str(FIXTURES / file))
    e = bench.examples[0]
    assert (e.id, e.question, e.answer) == first
    assert bench.name == Path(file).stem


def test_olympiadbench_multiple_answers_are_joined_and_amc_floats_stay_exact():
    ob = load_benchmark(str(FIXTURES / "olympiadbench.jsonl")).examples
    assert ob[1].answer == "$2$, $-2$"
    amc = load_benchmark(str(FIXTURES / "amc.jsonl")).examples
    assert [e.answer for e in amc] == ["55", "1.5"]


def test_benchmark_specs_name_and_limit():
    assert parse_spec("m=/x/math.jsonl") == ("m", "/x/math.jsonl")
    assert parse_spec("/x/MATH-500.jsonl") == ("MATH-500", "/x/MATH-500.jsonl")
    assert parse_spec("builtin:toy-arith?size=3") == ("toy-arith", "builtin:toy-arith?size=3")
    bench = load_benchmark(f"m={FIXTURES / 'math500.jsonl'}", limit=2)
    assert bench.name == "m" and len(bench.examples) == 2
    with pytest.raises(UserError, match="two data sets are named 'math500'"):
        load_benchmarks([str(FIXTURES / "math500.jsonl")] * 2)


def test_benchmark_rows_without_question_or_answer_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no question field"):
        benchmark_record({"answer": "1"})
    with pytest.raises(ValueError, match="no answer field.*no .boxed"):
        benchmark_record({"problem": "p", "solution": "no box here"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "What?", "answer": "1"}\n{"problem": "Where?"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: no answer field"):
        load_benchmark(str(bad))


# ------------------------------------------------------------------------------------------ bad input (CLI)


def _eval(args, capsys):
    rc = main(["eval", *map(str, args)])
    return rc, capsys.readouterr().err


def test_eval_missing_model_folder_is_exit_2_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _eval(["--model", tmp_path / "nope", "--data", FIXTURES / "math500.jsonl", "--out", out], capsys)
    assert rc == 2 and "model folder" in err and "not found" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_eval_data_without_the_fields_is_exit_2(tmp_path, capsys, tiny_llama_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "What is 1 + 1?", "label": "2"}\n')
    out = tmp_path / "out"
    rc, err = _eval(["--model", tiny_llama_dir, "--data", bad, "--out", out], capsys)
    assert rc == 2 and "no question field" in err and not out.exists()


def test_eval_k_larger_than_samples_is_exit_2(tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "out"
    args = ["--model", tiny_llama_dir, "--data", FIXTURES / "amc.jsonl", "--out", out, "--samples", "4"]
    rc, err = _eval([*args, "--k", "1,8"], capsys)
    assert rc == 2 and "--k 8 is outside 1..--samples (4)" in err and not out.exists()
    rc, err = _eval([*args, "--think-budget", "64", "--max-tokens", "32"], capsys)
    assert rc == 2 and "--think-budget (64) must be below --max-tokens (32)" in err


def _without_tokenizer(model: Path, folder: Path) -> Path:
    """A copy of ``model``'s config and weights only, as a model saved without its tokenizer."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((model / name).read_bytes())
    return folder


def test_eval_of_a_model_folder_without_a_tokenizer_is_one_line_and_exit_2(tmp_path, capsys, tiny_llama_dir):
    model = _without_tokenizer(tiny_llama_dir, tmp_path / "no-tokenizer")
    out = tmp_path / "out"
    rc, err = _eval(["--model", model, "--data", FIXTURES / "amc.jsonl", "--out", out, "--engine", "hf"], capsys)
    assert rc == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"dler eval: error: model folder {model} has no tokenizer (none of tokenizer.json, ")
    assert "save_pretrained" in line and not out.exists()


def test_eval_of_a_model_folder_with_a_damaged_tokenizer_is_one_line_and_exit_2(tmp_path, capsys, tiny_llama_dir):
    model = _without_tokenizer(tiny_llama_dir, tmp_path / "bad-tokenizer")
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    out = tmp_path / "out"
    rc, err = _eval(["--model", model, "--data", FIXTURES / "amc.jsonl", "--out", out, "--engine", "hf"], capsys)
    assert rc == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"dler eval: error: model bad-tokenizer: cannot load the tokenizer of model folder {model}")
    assert not out.exists()


def test_eval_refuses_an_existing_output_folder(tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _eval(["--model", tiny_llama_dir, "--data", FIXTURES / "amc.jsonl", "--out", out], capsys)
    assert rc == 2 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_end_to_end_with_vllm_writes_consistent_results(tmp_path, tiny_llama_dir, capfd, monkeypatch):
    # vLLM's default level (INFO) in the log; importing trl sets VLLM_LOGGING_LEVEL=ERROR for the whole process.
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    out = tmp_path / "eval"
    args = ["--model", f"tiny={tiny_llama_dir}", "--data", FIXTURES / "math500.jsonl", "--data",
            f"amc={FIXTURES / 'amc.jsonl'}", "--samples", "4", "--max-tokens", "12", "--out", out, "--no-progress",
            "--checker", "exact", "--think-budget", "6", "--answer-tokens", "3"]  # fmt: skip
    rc = main(["eval", *map(str, args)])
    console = capfd.readouterr()  # this process's output and the generating child's
    assert rc == 0, console.err[-3000:]
    # vLLM's log is in OUT, not on the console.
    assert "non-default args" in (out / "engine.log").read_text()
    assert "non-default args" not in console.out + console.err and "INFO" not in console.out + console.err
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"tiny"} and set(results["results"]["tiny"]) == {"math500", "amc"}
    for name, questions in (("math500", 3), ("amc", 2)):
        r = results["results"]["tiny"][name]
        for key in ("pass@1", "mean_length", "truncation_rate", "pass@k", "majority"):
            assert key in r
        samples = [json.loads(line) for line in (out / "samples" / "tiny" / f"{name}.jsonl").read_text().splitlines()]
        assert len(samples) == questions * 4 and r["questions"] == questions
        assert r["pass@1"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
        assert r["mean_length"] == pytest.approx(sum(s["tokens"] for s in samples) / len(samples))
        assert r["truncation_rate"] == pytest.approx(
            sum(s["finish_reason"] == "length" for s in samples) / len(samples)
        )
        assert list(r["pass@k"]) == ["1", "2", "4"] and r["pass@k"]["1"] == pytest.approx(r["pass@1"])
        assert r["pass@k"]["1"] <= r["pass@k"]["2"] <= r["pass@k"]["4"]
        # Budget forcing: no sample ever thinks past the budget.
        assert all(s["think_tokens"] <= 6 for s in samples) and r["max_think_tokens"] <= 6
        forced = [s for s in samples if s["forced"]]
        assert all(s["tokens"] <= 12 for s in samples if not s["forced"])
        assert all(
            s["tokens"] <= 6 + 13 + 3 for s in forced
        )  # budget + "\n</think>\n\nFinal answer: \\boxed{" + answer
        assert all("</think>" in s["text"] and "Final answer: \\boxed{" in s["text"] for s in forced)
        points = results["scaling"]["tiny"][name]
        assert [p["k"] for p in points] == [1, 2, 4] and all(p["seconds"] > 0 for p in points)
    avg = results["average"]["tiny"]
    per = results["results"]["tiny"]
    assert avg["pass@1"] == pytest.approx((per["math500"]["pass@1"] + per["amc"]["pass@1"]) / 2)
    md = (out / "results.md").read_text()
    assert "| tiny |" in md and "math500 acc" in md
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "scaling.png").stat().st_size > 1000
    assert not (out / ".work").exists()


def test_results_markdown_is_a_table_per_model():
    per = {
        "pass@1": 0.5,
        "mean_length": 100.0,
        "truncation_rate": 0.25,
        "pass@k": {"1": 0.5, "2": 0.75},
        "majority": 0.5,
    }
    results = {
        "settings": {"samples": 2, "temperature": 0.6, "top_p": 0.95, "max_tokens": 64, "think": None, "engine": "hf"},
        "datasets": {"d": "d.jsonl"},
        "results": {"base": {"d": per}, "dler": {"d": dict(per, **{"pass@1": 0.625, "mean_length": 40.0})}},
        "average": {"base": {"pass@1": 0.5, "mean_length": 100.0}, "dler": {"pass@1": 0.625, "mean_length": 40.0}},
        "scaling": {},
    }
    md = results_markdown(results)
    assert "| base | 50.0 | 100 | 50.0 | 100 |" in md and "| dler | 62.5 | 40 | 62.5 | 40 |" in md
    assert "| base | d | 50.0 | 75.0 | 50.0 | 25.0 |" in md


def test_a_bad_benchmark_row_tells_the_eval_user_what_they_can_do_not_an_option_eval_lacks(tmp_path, capsys,
                                                                                          tiny_llama_dir):  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "What?", "answer": "1"}\n{"problem": "Where?"}\n')
    out = tmp_path / "out"
    rc, err = _eval(["--model", tiny_llama_dir, "--data", bad, "--out", out], capsys)
    assert rc == 2 and not out.exists()
    [line] = err.strip().splitlines()
    assert f"{bad}:2: no answer field" in line
    assert "on_bad_row" not in line and "--on-bad-row" not in line  # dler eval has no such option
    assert "fix or remove the row" in line


def _model_folder(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")  # a dler checkpoint's model/ carries its source's tokenizer
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    return path


def test_a_train_checkpoint_is_evaluated_through_its_model_folder_and_named_after_the_step(tmp_path):
    from trainer.commands.evaluate import parse_model

    step = tmp_path / "run" / "checkpoints" / "step-00000030"
    _model_folder(step / "model")
    spec = parse_model(str(step))
    assert (spec.name, spec.path) == ("step-00000030", step / "model")
    assert parse_model(f"dler={step}").name == "dler"


def test_a_folder_without_a_model_names_what_it_needs(tmp_path):
    from trainer.commands.evaluate import parse_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"is not a model folder: it needs config.json .* RUN/checkpoints/step-N"):
        parse_model(str(tmp_path / "empty"))
