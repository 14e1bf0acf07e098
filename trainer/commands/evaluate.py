"""``dler eval``: accuracy against tokens, the paper's protocol (16 samples at temperature 0.6,
top-p 0.95, up to 32k tokens).

For every model and benchmark: ``samples`` responses per question (vLLM when installed; temperature 0.6,
top-p 0.95 by default), scored by :class:`~trainer.reward.answers.AnswerChecker`. Reported per (model, dataset):

* ``pass@1``: the mean correctness over all samples (the paper's "average pass@1");
* ``pass@k``: the unbiased estimator of Chen et al. 2021 from the same samples, for each k;
* ``majority``: majority-vote accuracy (the most frequent extracted answer, ties to the earliest);
* ``mean_length`` (tokens of the response) and ``truncation_rate`` (responses cut by ``max_tokens``);
* the test-time scaling curve: for each K, the wall time of one generation of K parallel samples per question
  (measured: its own run) against pass@K.

Budget forcing (``think_budget``): ``trainer.rollout.budget_forcing``. The numbers:
``trainer.commands.eval_metrics``; the reports: ``trainer.commands.eval_report``. This module is the command:
settings, the children that generate, scoring.

Each model runs in its own child process: a vLLM engine does not give its memory back inside a process, so a
second model would not fit. The child writes raw generations and timings; this process scores them and writes
``results.json``, ``results.md``, ``samples/``, ``pareto.png`` and ``scaling.png`` into OUT, atomically. The
engines' own output (vLLM's log, what loading a model prints) goes to ``engine.log`` in OUT, every model's
after the previous one's; the console keeps the progress and the engines' errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint.layout import MODEL_DIR
from ..fsutil import UserError, atomic_directory, check_output
from ..model_files.hf_folder import check_tokenizer, load_tokenizer
from ..model_files.weights import check_safetensors_folder
from ..rollout.budget_forcing import ThinkBudget, generate
from ..rollout.engine_log import ENGINE_LOG, last_lines
from .eval_metrics import default_ks, mean, pass_at_k_mean, summarise
from .eval_report import plot_pareto, plot_scaling, results_markdown

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


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
        from ..data import TEMPLATES

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
    """``NAME=DIR``, a folder, a ``dler train`` checkpoint (its ``model/`` folder, named after the checkpoint),
    or an alias (``smollm2``, ``tiny-llama``); checked before any work starts."""
    from ..models.resolve import is_alias, resolve_model

    name, eq, rest = spec.partition("=")
    if not (eq and name and "/" not in name):
        name, rest = "", spec
    if not is_alias(rest):
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise UserError(f"model folder {path} not found (from --model {spec!r})")
        if not (path / "config.json").is_file() and (path / MODEL_DIR / "config.json").is_file():
            name, path = name or path.name, path / MODEL_DIR  # a checkpoint: "model" would name them all alike
            rest = str(path)
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} is not a model folder: it needs config.json and *.safetensors weights (or a dler "
                f"checkpoint folder, RUN/checkpoints/step-N, with them in its {MODEL_DIR}/)"
            )
        check_safetensors_folder(path)  # safetensors only, whole: refused here, not in the engine's process
        check_tokenizer(path)
    path = resolve_model(rest)
    return ModelSpec(name or (rest if is_alias(rest) else path.name), path)


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
    from ..rollout.engines import resolve_engine

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
    proc = subprocess.run([sys.executable, "-m", "trainer.commands.evaluate", str(work)])
    log_end = last_lines(engine_log) if proc.returncode != 0 else ""
    if log_end:
        # A failed eval leaves no OUT folder, and so no engine.log: its end goes with the error.
        print(f"dler eval: the end of {model.name}'s engine log:\n{log_end}", file=sys.stderr)
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
        (work / "error.txt").write_text(str(e))  # the parent says it, as its one error line
        return 2
    return 0


def _child_generate(job: dict, work: Path) -> None:
    from ..data import Example, build_prompts
    from ..progress import progress
    from ..rollout.engines import make_engine

    settings = EvalSettings(**job["settings"])
    model_dir = Path(job["model"])
    tokenizer = load_tokenizer(model_dir)
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
    from ..reward.answer_extraction import extract_answer
    from ..reward.answers import AnswerChecker

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
                            "mean_length": mean([r["tokens"] for g in timed["groups"] for r in g]),
                        }
                    )
                if points:
                    scaling[bench.name] = points
            results["results"][model.name] = per_model
            results["average"][model.name] = {
                key: mean([m[key] for m in per_model.values()]) for key in ("pass@1", "mean_length", "truncation_rate")
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


def _write_samples(path: Path, bench, groups, correct) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for example, group, cs in zip(bench.examples, groups, correct):
            for i, (r, c) in enumerate(zip(group, cs)):
                record = {"id": example.id, "sample": i, "answer": example.answer, "correct": c, **r}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    sys.exit(_child_main(Path(sys.argv[1])))
