"""A projection, not a measurement: the step time of the synchronous loop and of the asynchronous one
(``rollout.async_staleness`` >= 1) on a GPU node, from the phase times of a step.

    python bench/async_projection.py --generate 42 --train 18 --sync 3 --gpus 8
    python bench/async_projection.py --run runs/toy-cpu        # the phases of a run's metrics.jsonl

The model. A synchronous step on N colocated GPUs takes G + T + S: generation, the trainer's work (old
log-probs and update) and the weight sync with the engine's sleep and wake. The asynchronous loop gives the
engine N_e of the GPUs and the trainer the other N_t; both scale linearly with their GPUs (data-parallel
replicas, FSDP), so generation takes G * D / N_e and training T * D / N_t (D: the devices the phases were
measured on, N by default), and in the steady state a step takes the longer of the two plus the weight transfer
the trainer waits for (P, NCCL or the shared-memory copy):

    sync  = G + T + S
    async = max(G * D / N_e, T * D / N_t) + P

With linear scaling the best split (N_e / N = G / (G + T)) gives max(...) = G + T: the asynchronous loop then
gains only S - P, the sleep/wake and sync it no longer pays, and loses wherever the split cannot match the
ratio. What the model leaves out is where the asynchronous loop's reported gains come from (verl's 2.35-2.67x,
AReaL's 2.77x): generation's long tail (GPUs idle while a batch's last, longest responses finish) and its
sublinear scaling with devices; ``--tail`` (the fraction of generation time the GPUs would be idle in the tail,
which the engine fills with the next batch when it samples ahead) is that effect, as an assumption to vary.
The CPU check of the model: ``--run`` a synchronous and an asynchronous run of the demo and compare its
projection with the asynchronous run's measured step time (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def project(generate: float, train: float, sync: float, publish: float, gpus: int, engine_gpus: int,
            tail: float = 0.0, measured_on: int | None = None) -> dict[str, float]:  # fmt: skip
    """Projected seconds per step, synchronous and asynchronous (see the module's docstring). ``measured_on``:
    the devices the synchronous phases ran on (default ``gpus``; 1 for the CPU demo, whose colocated vLLM
    engine sets torch to one thread, so the synchronous loop computes on one core of two)."""
    d = gpus if measured_on is None else measured_on
    if not 0 < engine_gpus < gpus:
        raise ValueError(f"engine_gpus must be in (0, {gpus}): the engine and the trainer each need GPUs")
    if not 0 <= tail < 1:
        raise ValueError(f"tail must be in [0, 1), got {tail}")
    sync_step = generate + train + sync
    busy_generate = generate * (1 - tail)  # sampling ahead fills the tail's idle time with the next batch
    async_step = max(busy_generate * d / engine_gpus, train * d / (gpus - engine_gpus)) + publish
    return {"sync_s": sync_step, "async_s": async_step, "speedup": sync_step / async_step}


def best_split(generate, train, sync, publish, gpus: int, tail: float = 0.0, measured_on: int | None = None) -> dict:
    options = [dict(engine_gpus=n, **project(generate, train, sync, publish, gpus, n, tail, measured_on))
               for n in range(1, gpus)]  # fmt: skip
    return min(options, key=lambda o: o["async_s"])


def phases_of(run: Path) -> dict[str, float]:
    """Mean phase times of a run's steps after the first (generation, the trainer's work, the sync)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in records)  # noqa: E731
    return {"generate": mean("rollout_s") + mean("score_s"), "train": mean("logprob_s") + mean("update_s"),
            "sync": mean("sync_s"), "step": mean("step_s")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A projection of the synchronous and asynchronous step times.")
    p.add_argument("--run", type=Path, help="read the phases from this run folder's metrics.jsonl")
    p.add_argument("--generate", type=float, help="seconds of generation per step (synchronous, all GPUs)")
    p.add_argument("--train", type=float, help="seconds of old log-probs + update per step (all GPUs)")
    p.add_argument("--sync", type=float, default=0.0, help="seconds of weight sync + sleep/wake per step")
    p.add_argument("--publish", type=float, default=None, help="seconds the async trainer waits to hand off weights")
    p.add_argument("--gpus", type=int, default=2, help="devices of the node (2: the CPU demo's two cores)")
    p.add_argument("--tail", type=float, default=0.0, help="assumed idle fraction of generation (its long tail)")
    p.add_argument("--measured-on", type=int, default=None, help="devices the phases ran on (default: --gpus)")
    args = p.parse_args(argv)
    if args.run is not None:
        ph = phases_of(args.run)
        generate, train, sync = ph["generate"], ph["train"], ph["sync"]
        print(f"{args.run}: generate {generate:.3f} s, train {train:.3f} s, sync {sync:.3f} s, "
              f"measured step {ph['step']:.3f} s")  # fmt: skip
    elif args.generate is None or args.train is None:
        p.error("give --run, or --generate and --train")
    else:
        generate, train, sync = args.generate, args.train, args.sync
    publish = sync if args.publish is None else args.publish
    print(f"PROJECTION (not a measurement), {args.gpus} devices, tail {args.tail:.0%}:")
    for n in range(1, args.gpus):
        r = project(generate, train, sync, publish, args.gpus, n, args.tail, args.measured_on)
        print(f"  engine on {n}, trainer on {args.gpus - n}: sync {r['sync_s']:.3f} s, async {r['async_s']:.3f} s, "
              f"x{r['speedup']:.2f}")  # fmt: skip
    best = best_split(generate, train, sync, publish, args.gpus, args.tail, args.measured_on)
    print(f"  best split: engine on {best['engine_gpus']} (x{best['speedup']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
