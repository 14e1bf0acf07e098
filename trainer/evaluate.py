"""``dler eval``: accuracy against tokens, the paper's protocol (DESIGN.md section 3).

For every model and benchmark: ``samples`` responses per question (vLLM when installed; temperature 0.6,
top-p 0.95 by default), scored by :class:`~trainer.answers.AnswerChecker`. Reported per (model, dataset):

* ``pass@1``: the mean correctness over all samples (the paper's "average pass@1");
* ``pass@k``: the unbiased estimator of Chen et al. 2021 from the same samples, for each k;
* ``majority``: majority-vote accuracy (the most frequent extracted answer, ties to the earliest);
* ``mean_length`` (tokens of the response) and ``truncation_rate`` (responses cut by ``max_tokens``);
* the test-time scaling curve: for each K, the wall time of one generation of K parallel samples per question
  (measured: its own run) against pass@K.

Budget forcing (``think_budget``): thinking stops at N tokens; if the model has not closed it by then,
``\\n</think>`` and a final-answer cue are appended and the answer is generated with ``answer_tokens`` more
(so a forced response has at most N + cue + ``answer_tokens`` tokens).
A model that closes its thinking itself within N tokens goes on to answer normally. Either way, at most N
tokens are thought.

Each model runs in its own child process: a vLLM engine does not give its memory back inside a process, so a
second model would not fit. The child writes raw generations and timings; this process scores them and writes
``results.json``, ``results.md``, ``samples/``, ``pareto.png`` and ``scaling.png`` into OUT, atomically. The
engines' own output (vLLM's log, what loading a model prints) goes to ``engine.log`` in OUT, every model's
after the previous one's; the console keeps the progress and the engines' errors.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .engine_log import ENGINE_LOG, last_lines
from .fsutil import UserError, atomic_directory, check_output
from .weights import check_safetensors_folder

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


# ----------------------------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, c of them correct,
    is correct: 1 - C(n-c, k) / C(n, k), as a product so that large n neither overflows nor cancels."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_vote(answers: Sequence[str | None], correct: Sequence[float]) -> float:
    """1.0 when the most frequent extracted answer is a correct one. Answers are compared after dropping
    whitespace; a tie goes to the answer seen first; samples without an answer do not vote."""
    keys = ["".join(a.split()) if a is not None else None for a in answers]
    counts = Counter(k for k in keys if k)
    if not counts:
        return 0.0
    best = max(counts.values())
    winner = next(k for k in keys if k and counts[k] == best)
    return float(max(c for k, c in zip(keys, correct) if k == winner))


def default_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to ``samples``, and ``samples`` itself."""
    ks = [1 << i for i in range(samples.bit_length()) if 1 << i <= samples]
    return ks if ks[-1] == samples else [*ks, samples]


# ------------------------------------------------------------------------------------------- generation


@dataclass
class ThinkBudget:
    """Budget forcing: at most ``tokens`` of thinking, then ``end`` and ``cue``, then ``answer_tokens``."""

    tokens: int
    answer_tokens: int = 64
    end: str = "</think>"
    cue: str = "\n\nFinal answer: \\boxed{"

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"think budget must be >= 1 token, got {self.tokens}")
        if self.answer_tokens < 1:
            raise ValueError(f"answer_tokens must be >= 1, got {self.answer_tokens}")
        if not self.end:
            raise ValueError("the end-of-thinking string must not be empty")

    @property
    def forced_text(self) -> str:
        return f"\n{self.end}{self.cue}"


@dataclass
class Response:
    text: str
    tokens: int  # response tokens, forced ones included
    finish_reason: str  # "stop" or "length" (truncated)
    think_tokens: int | None = None  # with a think budget: tokens generated before the answer phase
    forced: bool = False  # the think budget ran out and the end of thinking was appended


def generate(
    engine,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    think: ThinkBudget | None = None,
) -> list[list[Response]]:
    """``n`` responses per prompt, with budget forcing when ``think`` is given."""
    kw = dict(temperature=temperature, top_p=top_p)
    if think is None:
        groups = engine.generate(list(prompts), n=n, max_tokens=max_tokens, seed=seed, **kw)
        return [[Response(s.text, len(s.token_ids), s.finish_reason) for s in group] for group in groups]
    if think.tokens >= max_tokens:
        raise ValueError(f"think budget ({think.tokens}) must be below max_tokens ({max_tokens})")
    first = engine.generate(list(prompts), n=n, max_tokens=think.tokens, seed=seed, stop=[think.end], **kw)
    forced_ids = tokenizer(think.forced_text, add_special_tokens=False).input_ids
    out = [
        [Response(s.text, len(s.token_ids), s.finish_reason, think_tokens=len(s.token_ids)) for s in group]
        for group in first
    ]
    # The answer phase. Forced samples (out of budget) get the end of thinking, the cue and answer_tokens
    # (outside max_tokens, which bounds thinking and unforced answers); samples that closed their thinking
    # themselves continue with what is left of max_tokens; samples that ended without closing a thought are
    # complete. One engine call per kind; the continuations of the second kind are cut to their own budgets
    # afterwards (the first b tokens of a longer sample are a sample of at most b tokens).
    forced, closed = [], []
    for gi, group in enumerate(first):
        for si, s in enumerate(group):
            if s.finish_reason == "length":
                forced.append((gi, si, forced_ids, think.answer_tokens))
            elif s.text.endswith(think.end) and max_tokens > len(s.token_ids):
                closed.append((gi, si, [], max_tokens - len(s.token_ids)))
    for k, jobs in enumerate((forced, closed)):
        if not jobs:
            continue
        conts = [[*prompts[gi], *first[gi][si].token_ids, *suffix] for gi, si, suffix, _ in jobs]
        budget = max(b for *_, b in jobs)
        second = engine.generate(conts, n=1, max_tokens=budget, seed=seed + 1 + k, **kw)
        for (gi, si, suffix, own), (c,) in zip(jobs, second):
            cont, reason = list(c.token_ids), c.finish_reason
            if len(cont) > own:
                cont, reason = cont[:own], "length"
            ids = [*first[gi][si].token_ids, *suffix, *cont]
            out[gi][si] = Response(
                tokenizer.decode(ids, skip_special_tokens=True),
                len(ids),
                reason,
                think_tokens=len(first[gi][si].token_ids),
                forced=bool(suffix),
            )
    return out


# ---------------------------------------------------------------------------------------------- settings

ENGINE_CHOICES = ("auto", "vllm", "hf")


@dataclass
class EvalSettings:
    """What one ``dler eval`` samples and reports. ``ks`` None: 1, 2, 4, ... up to ``samples``;
    ``scaling_ks`` None: the same list, empty: no scaling runs."""

    samples: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 32768
    ks: list[int] | None = None
    scaling_ks: list[int] | None = None
    think: ThinkBudget | None = None
    template: str = "r1"
    checker: str = "math"
    engine: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    seed: int = 0
    limit: int | None = None

    def __post_init__(self):
        from .data import TEMPLATES

        if isinstance(self.think, dict):
            self.think = ThinkBudget(**self.think)
        if self.samples < 1:
            raise UserError(f"--samples must be >= 1, got {self.samples}")
        if self.max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise UserError(f"need temperature >= 0 and top-p in (0, 1]; got {self.temperature}, {self.top_p}")
        self.ks = sorted(set(self.ks)) if self.ks is not None else default_ks(self.samples)
        self.scaling_ks = sorted(set(self.scaling_ks)) if self.scaling_ks is not None else list(self.ks)
        for flag, ks in (("--k", self.ks), ("--scaling-k", self.scaling_ks)):
            bad = [k for k in ks if not 1 <= k <= self.samples]
            if bad:
                raise UserError(
                    f"{flag} {bad[0]} is outside 1..--samples ({self.samples}): pass@k needs k <= the samples drawn "
                    f"per question; raise --samples or drop k={bad[0]}"
                )
        if not self.ks:
            raise UserError("--k needs at least one value")
        if self.think is not None and self.think.tokens >= self.max_tokens:
            raise UserError(f"--think-budget ({self.think.tokens}) must be below --max-tokens ({self.max_tokens})")
        if self.template not in TEMPLATES:
            raise UserError(f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.engine not in ENGINE_CHOICES:
            raise UserError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {self.engine!r}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.limit}")


@dataclass
class ModelSpec:
    name: str
    path: Path


def parse_model(spec: str) -> ModelSpec:
    """``NAME=DIR``, a folder, or an alias (``smollm2``, ``tiny-llama``); checked before any work starts."""
    from .models import MODEL_ALIASES, resolve_model

    name, eq, rest = spec.partition("=")
    if not (eq and name and "/" not in name):
        name, rest = "", spec
    if rest not in MODEL_ALIASES:
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise UserError(f"model folder {path} not found (from --model {spec!r})")
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model folder: it needs config.json and *.safetensors weights")
        check_safetensors_folder(path)  # safetensors only, whole: refused here, not in the engine's process
    path = resolve_model(rest)
    return ModelSpec(name or (rest if rest in MODEL_ALIASES else path.name), path)


# ------------------------------------------------------------------------------------------ the command


def run_eval(
    models: Sequence[str],
    data: Sequence[str],
    settings: EvalSettings,
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate every model on every data set; write OUT (atomically); return the results dict."""
    from .benchmarks import load_benchmarks

    out = Path(out).expanduser()
    check_output(out, "eval", overwrite=overwrite)  # before any model is resolved or built
    specs = [parse_model(m) for m in models]
    inputs = [(f"--model {m.name}", m.path) for m in specs]
    check_output(out, "eval", overwrite=overwrite, inputs=inputs)
    names = [m.name for m in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UserError(f"two models are named {dup!r}; name them apart with --model NAME=DIR")
    benches = load_benchmarks(list(data), limit=settings.limit, seed=settings.seed)
    from .engines import resolve_engine

    kind = resolve_engine(settings.engine)
    started = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite, flag="--overwrite", command="eval", inputs=inputs) as tmp:
        work = tmp / ".work"
        work.mkdir()
        for model in specs:
            _generate_in_child(model, benches, settings, kind, work / model.name, tmp / ENGINE_LOG, progress)
        results = _score(specs, benches, settings, kind, work, tmp)
        results["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / RESULTS_JSON).write_text(json.dumps(results, indent=1) + "\n")
        (tmp / RESULTS_MD).write_text(results_markdown(results))
        plot_pareto(results, tmp / "pareto.png")
        if settings.scaling_ks:
            plot_scaling(results, tmp / "scaling.png")
        import shutil

        shutil.rmtree(work)
    return results


def _generate_in_child(
    model: ModelSpec, benches, settings: EvalSettings, kind: str, work: Path, engine_log: Path, progress: bool
):
    work.mkdir(parents=True)
    job = {
        "model": str(model.path),
        "name": model.name,
        "engine": kind,
        "engine_log": str(engine_log),
        "settings": asdict(settings),
        "progress": progress,
        "datasets": [{"name": b.name, "examples": [[e.id, e.question, e.answer] for e in b.examples]} for b in benches],
    }
    (work / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "trainer.evaluate", str(work)])
    if proc.returncode != 0 and last_lines(engine_log):
        # A failed eval leaves no OUT folder, and so no engine.log: its end goes with the error.
        print(f"dler eval: the end of {model.name}'s engine log:\n{last_lines(engine_log)}", file=sys.stderr)
    if proc.returncode == 2 and (work / "error.txt").is_file():
        raise UserError(f"model {model.name}: {(work / 'error.txt').read_text().strip()}")
    if proc.returncode != 0:
        raise RuntimeError(f"generation for model {model.name} failed (exit code {proc.returncode}); see above")


def _child_main(work: Path) -> int:
    """Generate every data set's samples for one model (main run and scaling runs) into ``work``."""
    job = json.loads((work / "job.json").read_text())
    try:
        _child_generate(job, work)
    except UserError as e:
        (work / "error.txt").write_text(str(e))
        print(f"dler eval: error: {e}", file=sys.stderr)
        return 2
    return 0


def _child_generate(job: dict, work: Path) -> None:
    from transformers import AutoTokenizer

    from .data import Example, build_prompts
    from .engines import make_engine
    from .progress import progress

    settings = EvalSettings(**job["settings"])
    model_dir = Path(job["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = {
        d["name"]: [
            p.token_ids
            for p in build_prompts(
                tokenizer,
                [Example(q, a, i, d["name"]) for i, q, a in d["examples"]],
                template=settings.template,
                chat=chat,
            )
        ]
        for d in job["datasets"]
    }
    options: dict = {"seed": settings.seed, "dtype": settings.dtype, "log_file": Path(job["engine_log"])}
    if job["engine"] == "vllm":
        longest = max(len(p) for ps in prompts.values() for p in ps)
        generated = settings.max_tokens
        if settings.think is not None:  # a forced response: the budget, the cue and the answer
            forced = len(tokenizer(settings.think.forced_text, add_special_tokens=False).input_ids)
            generated = max(generated, settings.think.tokens + forced + settings.think.answer_tokens)
        options["max_model_len"] = settings.max_model_len or longest + generated
        options["gpu_memory_utilization"] = settings.gpu_memory_utilization
    engine = make_engine(job["engine"], model_dir, **options)
    runs = [(name, None) for name in prompts] + [(name, k) for name in prompts for k in settings.scaling_ks]
    bar = progress(runs, desc=f"eval {job['name']}", unit="run", enabled=job["progress"], dynamic_ncols=True)
    for name, k in bar:
        bar.set_postfix_str(f"{name} {'main' if k is None else f'K={k}'}")
        n = settings.samples if k is None else k
        start = time.perf_counter()
        groups = generate(
            engine,
            tokenizer,
            prompts[name],
            n=n,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed if k is None else settings.seed + 1000 * k,
            think=settings.think,
        )
        seconds = time.perf_counter() - start
        record = {"seconds": seconds, "n": n, "groups": [[asdict(r) for r in g] for g in groups]}
        stem = name if k is None else f"{name}.k{k}"
        (work / f"{stem}.json").write_text(json.dumps(record))
    bar.close()


# ------------------------------------------------------------------------------------------------ scoring


def _score(specs, benches, settings: EvalSettings, kind: str, work: Path, out: Path) -> dict:
    from .answers import AnswerChecker, extract_answer

    results: dict = {
        "settings": {**asdict(settings), "engine": kind},
        "models": {m.name: str(m.path) for m in specs},
        "datasets": {b.name: b.spec for b in benches},
        "results": {},
        "average": {},
        "scaling": {},
    }
    with AnswerChecker(settings.checker) as checker:
        for model in specs:
            per_model, scaling = {}, {}
            for bench in benches:
                golds = [e.answer for e in bench.examples]
                main = json.loads((work / model.name / f"{bench.name}.json").read_text())
                correct = _check(checker, main["groups"], golds)
                answers = [[extract_answer(r["text"]) for r in g] for g in main["groups"]]
                metrics = summarise(main["groups"], correct, answers, settings.ks, main["seconds"])
                per_model[bench.name] = metrics
                _write_samples(out / "samples" / model.name / f"{bench.name}.jsonl", bench, main["groups"], correct)
                points = []
                for k in settings.scaling_ks:
                    timed = json.loads((work / model.name / f"{bench.name}.k{k}.json").read_text())
                    hit = _check(checker, timed["groups"], golds)
                    points.append(
                        {
                            "k": k,
                            "seconds": round(timed["seconds"], 3),
                            "pass@k": pass_at_k_mean([int(sum(c)) for c in correct], settings.samples, k),
                            "solved_in_run": sum(max(c) for c in hit) / len(hit),
                            "mean_length": _mean([r["tokens"] for g in timed["groups"] for r in g]),
                        }
                    )
                if points:
                    scaling[bench.name] = points
            results["results"][model.name] = per_model
            results["average"][model.name] = {
                key: _mean([m[key] for m in per_model.values()]) for key in ("pass@1", "mean_length", "truncation_rate")
            }
            if scaling:
                results["scaling"][model.name] = scaling
    return results


def _check(checker, groups: list[list[dict]], golds: list[str]) -> list[list[float]]:
    texts = [r["text"] for g in groups for r in g]
    flat = checker.score(texts, [gold for gold, g in zip(golds, groups) for _ in g])
    out, i = [], 0
    for g in groups:
        out.append(flat[i : i + len(g)])
        i += len(g)
    return out


def pass_at_k_mean(counts: Sequence[int], n: int, k: int) -> float:
    return _mean([pass_at_k(n, c, k) for c in counts])


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def summarise(
    groups: list[list[dict]], correct: list[list[float]], answers: list[list[str | None]], ks: Sequence[int], seconds
) -> dict:
    """The metrics of one (model, data set) from its per-question samples and their correctness."""
    n = len(groups[0])
    lengths = sorted(r["tokens"] for g in groups for r in g)
    flat = [c for cs in correct for c in cs]
    metrics = {
        "questions": len(groups),
        "samples_per_question": n,
        "pass@1": _mean(flat),
        "pass@k": {str(k): pass_at_k_mean([int(sum(c)) for c in correct], n, k) for k in ks},
        "majority": _mean(majority_vote(a, c) for a, c in zip(answers, correct)),
        "mean_length": _mean(lengths),
        "median_length": float(lengths[len(lengths) // 2]),
        "p90_length": float(lengths[min(len(lengths) - 1, math.ceil(0.9 * len(lengths)) - 1)]),
        "truncation_rate": _mean(r["finish_reason"] == "length" for g in groups for r in g),
        "generate_seconds": round(seconds, 3),
        "tokens_per_second": round(sum(lengths) / seconds, 1) if seconds > 0 else None,
    }
    think = [r["think_tokens"] for g in groups for r in g if r.get("think_tokens") is not None]
    if think:
        metrics["forced_rate"] = _mean(r["forced"] for g in groups for r in g)
        metrics["mean_think_tokens"] = _mean(think)
        metrics["max_think_tokens"] = max(think)
    return metrics


def _write_samples(path: Path, bench, groups, correct) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for example, group, cs in zip(bench.examples, groups, correct):
            for i, (r, c) in enumerate(zip(group, cs)):
                record = {"id": example.id, "sample": i, "answer": example.answer, "correct": c, **r}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------ reports


def results_markdown(results: dict) -> str:
    """Table 1 of the paper (accuracy and length per benchmark, then the average), then pass@k,
    majority vote and truncation, then the scaling runs."""
    models, datasets = list(results["results"]), list(results["datasets"])
    s = results["settings"]
    lines = [
        "# Evaluation",
        "",
        f"{s['samples']} samples per question, temperature {s['temperature']}, top-p {s['top_p']}, "
        f"max {s['max_tokens']} tokens"
        + (f", think budget {s['think']['tokens']} tokens" if s.get("think") else "")
        + f"; engine {s['engine']}. Accuracy: average pass@1 (%); length: mean response tokens.",
        "",
        "| Model | " + " | ".join(f"{d} acc | {d} len" for d in datasets) + " | Avg acc | Avg len |",
        "|---|" + "---:|---:|" * (len(datasets) + 1),
    ]
    for m in models:
        cells = [
            f"{results['results'][m][d]['pass@1'] * 100:.1f} | {results['results'][m][d]['mean_length']:.0f}"
            for d in datasets
        ]
        avg = results["average"][m]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg['pass@1'] * 100:.1f} | {avg['mean_length']:.0f} |")
    ks = list(next(iter(next(iter(results["results"].values())).values()))["pass@k"])
    lines += [
        "",
        "## pass@k, majority vote, truncation",
        "",
        "| Model | Data | " + " | ".join(f"pass@{k}" for k in ks) + " | majority | truncated |",
        "|---|---|" + "---:|" * (len(ks) + 2),
    ]
    for m in models:
        for d in datasets:
            r = results["results"][m][d]
            cells = " | ".join(f"{r['pass@k'][k] * 100:.1f}" for k in ks)
            lines.append(f"| {m} | {d} | {cells} | {r['majority'] * 100:.1f} | {r['truncation_rate'] * 100:.1f} |")
    if results.get("scaling"):
        lines += [
            "",
            "## Test-time scaling: K parallel samples per question",
            "",
            "Wall time of one generation of K samples per question (measured), pass@K estimated from the main samples.",
            "",
            "| Model | Data | K | seconds | pass@K | mean len |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for m, per in results["scaling"].items():
            for d, points in per.items():
                for p in points:
                    cells = f"{p['k']} | {p['seconds']:.2f} | {p['pass@k'] * 100:.1f} | {p['mean_length']:.0f}"
                    lines.append(f"| {m} | {d} | {cells} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(results: dict, path: Path) -> None:
    """Accuracy against mean length: one colour per model, one marker per data set, a star for the average."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "osD^vP<>Xh"
    datasets = list(results["datasets"])
    for i, (model, per) in enumerate(results["results"].items()):
        colour = f"C{i % 10}"
        for j, d in enumerate(datasets):
            ax.plot(per[d]["mean_length"], per[d]["pass@1"] * 100, markers[j % len(markers)], color=colour, alpha=0.7)
        avg = results["average"][model]
        ax.plot(avg["mean_length"], avg["pass@1"] * 100, "*", color=colour, markersize=14, label=f"{model} (average)")
    for j, d in enumerate(datasets):
        ax.plot([], [], markers[j % len(markers)], color="grey", label=d)
    ax.set(xlabel="mean response length (tokens)", ylabel="average pass@1 (%)", title="accuracy against tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, plt)


def plot_scaling(results: dict, path: Path) -> None:
    """pass@K against the wall time of K parallel samples, one panel per data set, one line per model."""
    plt = _pyplot()
    datasets = list(results["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for i, (model, per) in enumerate(results["scaling"].items()):
            points = per.get(d, [])
            xs, ys = [p["seconds"] for p in points], [p["pass@k"] * 100 for p in points]
            ax.plot(xs, ys, "o-", color=f"C{i % 10}", label=model)
            for p, x, y in zip(points, xs, ys):
                ax.annotate(f"K={p['k']}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel="wall time of K parallel samples (s)", ylabel="pass@K (%)", title=d)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, plt)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(_child_main(Path(sys.argv[1])))
