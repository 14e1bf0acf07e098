"""Every objective's policy loss, fwd+bwd, on the CPU: time and peak memory as ratios to PPO-clip on the same path
(its fused kernel) and to verl's eager torch loss on the same inputs (verl's own function on log_softmax(logits);
run in the verl venv, `make verl-env`, in a child process).

    python bench/bench_objectives.py                          # the `make bench` shapes
    python bench/bench_objectives.py --n 1024 --vocab 32000   # any shape

Rows: the logits path (``policy_loss``: PPO-clip fused, every other objective in two passes: log-prob kernel,
objective on [N] vectors, gradient kernel) and the fused-linear path (``linear_policy_loss``: the others recompute
the logits once more). Time: median of ``--repeats`` timed calls after a warm-up. Memory: the peak resident-set
growth of one call in a fresh process (cpu_memory.py), logits included for the eager rows (they build them) and
excluded for ours (they are an input); for the fused-linear path nothing of N x V exists. Every number is measured
in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from cpu_memory import peak_growth

import dler_kernels as dk
from dler_kernels.objectives import OBJECTIVES

# our objective -> (verl's loss_mode, our options for verl's defaults); None: verl has no such loss
VERL_NAMES = {"ppo_clip": "vanilla", "gspo_token": "gspo", "cispo": "cispo", "sapo": "sapo", "gmpo": "geo_mean",
              "dppo_tv": "dppo_tv", "dppo_kl": "dppo_kl"}  # fmt: skip
VERL_AGG = {"sapo": "seq-mean-token-mean", "gmpo": "seq-mean-token-mean"}  # verl fixes these aggregations
ROOT = Path(__file__).resolve().parents[1]


def make_inputs(args, linear: bool):
    g = torch.Generator().manual_seed(0)
    n = args.n
    old = -torch.rand(n, generator=g) * 3 - 8
    adv = torch.randn(n // args.seq_len, generator=g).repeat_interleave(args.seq_len)
    mask = torch.rand(n, generator=g) > 0.05
    targets = torch.randint(0, args.vocab, (n,), generator=g)
    seq = torch.arange(n) // args.seq_len
    if linear:
        hidden = torch.randn(n, args.hidden, generator=g)
        weight = torch.randn(args.vocab, args.hidden, generator=g) * args.hidden**-0.5
        return dict(hidden=hidden, weight=weight, targets=targets, old=old, adv=adv, mask=mask, seq=seq)
    return dict(logits=torch.randn(n, args.vocab, generator=g), targets=targets, old=old, adv=adv, mask=mask, seq=seq)


def call(impl: str, objective: str, x: dict, backend: str | None):
    """One fwd+bwd of ``impl`` (logits / linear / verl) for ``objective`` on the inputs ``x`` (fresh leaves)."""
    agg = VERL_AGG.get(objective, "token-mean")
    opts = dict(objective=objective, loss_agg=agg, seq_ids=x["seq"], backend=backend)
    if impl == "logits":
        logits = x["logits"].detach().requires_grad_(True)
        dk.policy_loss(logits, x["targets"], x["old"], x["adv"], x["mask"], **opts).loss.backward()
    elif impl == "linear":
        hidden = x["hidden"].detach().requires_grad_(True)
        weight = x["weight"].detach().requires_grad_(True)
        dk.linear_policy_loss(hidden, weight, x["targets"], x["old"], x["adv"], x["mask"], **opts).loss.backward()
    else:  # verl's eager loss, in the verl venv: the [B, L] layout it takes
        from verl.trainer.ppo import core_algos
        from verl.workers.config import FSDPActorConfig

        cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, clip_ratio=0.2, ppo_micro_batch_size_per_gpu=1)
        b = x["logits"].shape[0] // x["seq_len"]
        logits = x["logits"].detach().requires_grad_(True)
        logp = torch.log_softmax(logits, -1).gather(-1, x["targets"][:, None])[:, 0].view(b, -1)
        fn = core_algos.get_policy_loss_fn(VERL_NAMES[objective])
        loss = fn(old_log_prob=x["old"].view(b, -1), log_prob=logp, advantages=x["adv"].view(b, -1),
                  response_mask=x["mask"].view(b, -1).float(), loss_agg_mode=agg, config=cfg)[0]  # fmt: skip
        loss.backward()


def time_call(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def child(args):
    """In a fresh process: time and peak memory of one implementation and objective, as JSON."""
    impl, objective = args.rss_child.split(":")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    tiny = argparse.Namespace(**{**vars(args), "n": 64, "vocab": 128, "seq_len": 16})
    call(impl, objective, {**make_inputs(tiny, impl == "linear"), "seq_len": 16}, args.backend)  # warm-up
    x = {**make_inputs(args, impl == "linear"), "seq_len": args.seq_len}
    peak = peak_growth(lambda: call(impl, objective, x, args.backend))
    ms = time_call(lambda: call(impl, objective, x, args.backend), args.repeats)
    print(json.dumps(dict(ms=ms, peak_bytes=peak)))


def verl_python() -> str | None:
    path = ROOT / os.environ.get("DLER_VERL_VENV", ".venv-verl") / "bin" / "python"
    return str(path) if path.exists() else None


def measure(args) -> list[dict]:
    rows = []
    verl = verl_python()
    for objective in OBJECTIVES:
        row = dict(objective=objective)
        for impl in ("logits", "linear", "verl"):
            if impl == "verl" and (verl is None or objective not in VERL_NAMES):
                continue
            argv = [sys.executable if impl != "verl" else verl, __file__, "--rss-child", f"{impl}:{objective}"]
            argv += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if v is not None and k not in ("rss_child", "json")]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
            out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
            if out.returncode != 0:
                row[impl] = dict(error=out.stderr.strip().splitlines()[-1][:200])
                continue
            row[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
    return rows


def print_table(args, rows):
    base = next(r for r in rows if r["objective"] == "ppo_clip")
    print(f"objectives fwd+bwd, CPU, {args.threads or torch.get_num_threads()} threads, backend "
          f"{args.backend or dk.backend_for(torch.zeros(1))}: logits N={args.n} V={args.vocab} fp32; fused-linear "
          f"N={args.n} H={args.hidden} V={args.vocab}; {args.seq_len} tokens per sequence")  # fmt: skip
    head = (f"{'objective':12s} {'logits ms':>10s} {'x ppo':>7s} {'x verl':>7s} {'mem x ppo':>10s} {'mem x verl':>11s}"
            f" {'linear ms':>10s} {'x ppo':>7s} {'mem MiB':>8s}")  # fmt: skip
    print(head)
    print("-" * len(head))

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}" if a and b and "error" not in a and "error" not in b and b[key] else "-"

    for r in rows:
        lg, ln, vr = r.get("logits"), r.get("linear"), r.get("verl")
        print(f"{r['objective']:12s} {lg.get('ms', float('nan')):10.1f} {ratio(lg, base.get('logits'), 'ms'):>7s} "
              f"{ratio(lg, vr, 'ms'):>7s} {ratio(lg, base.get('logits'), 'peak_bytes'):>10s} "
              f"{ratio(lg, vr, 'peak_bytes'):>11s} {ln.get('ms', float('nan')):10.1f} "
              f"{ratio(ln, base.get('linear'), 'ms'):>7s} {ln.get('peak_bytes', 0) / 2**20:8.1f}")  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="tokens")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=64, help="the fused-linear path's H")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default=None, help="our backend (default: the best on the CPU)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return child(args)
    if args.n % args.seq_len:
        p.error(f"--n ({args.n}) must be a multiple of --seq-len ({args.seq_len})")
    rows = measure(args)
    print_table(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
