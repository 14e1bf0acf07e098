"""The default loss (PPO-clip, fwd+bwd) of two source trees, side by side in one run: is a change to the kernels
slower or larger on the default path? Each tree is a checkout with its extension built in place (``python setup.py
build_ext --inplace``); every measurement runs in a fresh process with that tree first on ``sys.path``, the trees
alternating, so that both see the same machine state.

    git worktree add ../before <commit> && (cd ../before && python setup.py build_ext --inplace)
    python bench/bench_revisions.py ../before .

Rows: ``policy_loss`` on [N, V] logits and ``linear_policy_loss`` from [N, H] hidden states, on the backend given
(default: the C++ ``cpu`` backend). Time: the median over ``--rounds`` rounds of each round's median of
``--repeats`` timed calls; memory: the peak resident-set growth of one call (``cpu_memory.peak_growth``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, statistics, sys, time
import torch
sys.path.insert(0, {bench!r})
from cpu_memory import peak_growth
import dler_kernels as dk
assert dk.__file__.startswith({tree!r}), dk.__file__
n, v, h, repeats, backend, path = {n}, {vocab}, {hidden}, {repeats}, {backend!r}, {path!r}
g = torch.Generator().manual_seed(0)
old = -torch.rand(n, generator=g) * 3 - 8
adv = torch.randn(n, generator=g)
mask = torch.rand(n, generator=g) > 0.05
targets = torch.randint(0, v, (n,), generator=g)
if path == "logits":
    logits = torch.randn(n, v, generator=g)
    def call():
        x = logits.detach().requires_grad_(True)
        dk.policy_loss(x, targets, old, adv, mask, backend=backend).loss.backward()
else:
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * h ** -0.5
    def call():
        x, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        dk.linear_policy_loss(x, w, targets, old, adv, mask, backend=backend).loss.backward()
call()
peak = peak_growth(call)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append((time.perf_counter() - start) * 1e3)
print(json.dumps(dict(ms=statistics.median(times), peak_bytes=peak)))
"""


def measure(tree: Path, path: str, args) -> dict:
    code = CHILD.format(bench=str(HERE), tree=str(tree), n=args.n, vocab=args.vocab, hidden=args.hidden,
                        repeats=args.repeats, backend=args.backend, path=path)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{tree} ({path}): {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def revision(tree: Path) -> str:
    """The tree's commit, + when it has uncommitted changes (no machine path in a table that is shared)."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)  # fmt: skip
    return (head.stdout.strip() or tree.name) + ("+" if dirty.stdout.strip() else "")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs=2, type=Path, help="the two source trees: before, after")
    p.add_argument("--n", type=int, default=2048, help="tokens")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=64, help="the fused-linear path's H")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the trees alternating")
    p.add_argument("--backend", default="cpu")
    args = p.parse_args()
    trees = [t.resolve() for t in args.trees]
    results = {(t, path): [] for t in trees for path in ("logits", "linear")}
    for _ in range(args.rounds):
        for path in ("logits", "linear"):
            for tree in trees:
                results[tree, path].append(measure(tree, path, args))
    print(f"PPO-clip fwd+bwd, backend {args.backend}, N={args.n} V={args.vocab} (linear: H={args.hidden}), fp32; "
          f"median of {args.rounds} rounds x {args.repeats} calls")  # fmt: skip
    print(f"{'path':8s} {'revision':12s} {'ms':>8s} {'peak MiB':>9s} {'ms x first':>11s}")
    for path in ("logits", "linear"):
        first = statistics.median(r["ms"] for r in results[trees[0], path])
        for tree in trees:
            rows = results[tree, path]
            ms = statistics.median(r["ms"] for r in rows)
            mib = max(r["peak_bytes"] for r in rows) / 2**20
            print(f"{path:8s} {revision(tree):12s} {ms:8.1f} {mib:9.1f} {ms / first:11.3f}")


if __name__ == "__main__":
    main()
