"""Run in a subprocess by tests/trainer/checkpoint/test_checkpoint.py: FSDP2 checkpoints with 2 CPU processes (gloo).

Each rank: the tiny model with ``fully_shard`` on every decoder layer and on the root, one AdamW
step on its own data, ``CheckpointManager.save``. Then, as an oracle independent of the code under
test, the full weights and optimizer state gathered with ``DTensor.full_tensor`` go to
OUT/expected.pt. Then a fresh sharded model loads the checkpoint: its full weights and optimizer
state must equal the saved ones, and one more step on both must give identical losses and weights.
Last, failures on rank 0 (a full disk during a save, a damaged file at a load) must be raised on
both ranks instead of leaving rank 1 blocked in a collective. Prints one JSON object on the last line.

usage: python ckpt_fsdp.py MODEL_DIR OUT
"""

import errno
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import trainer.checkpoint.files as checkpoint_files
from trainer.checkpoint.manager import CheckpointManager
from trainer.fsutil import UserError

WORLD = 2


def build(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, seed: int) -> float:
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def gathered(model, optimizer) -> tuple[dict, dict]:
    """Full weights and optimizer state by parameter name, gathered with DTensor.full_tensor (collective)."""
    names = {id(p): n for n, p in model.named_parameters()}
    weights = {n: full(p.detach()) for n, p in model.named_parameters()}
    optim = {names[id(p)]: {k: full(v) for k, v in s.items()} for p, s in optimizer.state.items()}
    return weights, optim


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a
    )


def disk_full(*args) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def rank0_failures(manager, path, model, optimizer, scheduler, rank: int, out: Path) -> dict:
    """What every rank sees when rank 0 fails during a save and during a load (gathered from all ranks)."""
    seen = []
    original, checkpoint_files.write_optimizer = checkpoint_files.write_optimizer, disk_full
    try:
        manager.save(2, model, optimizer, scheduler, {})
    except UserError as e:
        seen.append(str(e))
    checkpoint_files.write_optimizer = original
    damaged = out / "damaged" / "step-00000001"
    if rank == 0:
        shutil.copytree(path, damaged)
        data = bytearray((damaged / "optimizer.pt").read_bytes())
        data[100] ^= 1
        (damaged / "optimizer.pt").write_bytes(bytes(data))
    try:
        manager.load(damaged if rank == 0 else Path("/nonexistent"), model, optimizer, scheduler)
    except UserError as e:
        seen.append(str(e))
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, seen)
    return {"messages": everyone, "left_in_checkpoints": sorted(p.name for p in manager.root.iterdir())}


def worker(rank: int, model_dir: str, out: str) -> None:
    import spawned_rank  # beside this script; imported here as test_fsdp.py loads this file as a module

    spawned_rank.start()
    torch.set_num_threads(1)
    model_dir, out = Path(model_dir), Path(out)
    dist.init_process_group("gloo", init_method=f"file://{out / 'pg-init'}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model, optimizer, scheduler = build(model_dir)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    train_step(model, optimizer, scheduler, seed=rank)
    manager = CheckpointManager(out / "run", source_model_dir=model_dir)
    path = manager.save(1, model, optimizer, scheduler, {"ranks": WORLD})
    weights, optim = gathered(model, optimizer)
    if rank == 0:
        torch.save({"weights": weights, "optim": optim}, out / "expected.pt")

    # Resume into a fresh sharded model (rank 1 is given no path: only rank 0 reads).
    model2, optimizer2, scheduler2 = build(model_dir)
    state = manager.load(path if rank == 0 else Path("/nonexistent"), model2, optimizer2, scheduler2)
    weights2, optim2 = gathered(model2, optimizer2)
    reload_equal = equal(weights, weights2) and equal(optim, optim2)
    lr_equal = scheduler.get_last_lr() == scheduler2.get_last_lr()
    runs = ((model, optimizer, scheduler), (model2, optimizer2, scheduler2))
    losses = [train_step(m, o, s, seed=10 + rank) for m, o, s in runs]
    step_equal = equal(gathered(model, optimizer)[0], gathered(model2, optimizer2)[0])
    errors = rank0_failures(manager, path, model, optimizer, scheduler, rank, out)
    if rank == 0:
        result = dict(
            path=str(path),
            tied_after_fully_shard=tied,
            state=state,
            reload_equal=reload_equal,
            lr_equal=lr_equal,
            losses=losses,
            next_step_equal=step_equal,
            errors=errors,
        )
        (out / "result.json").write_text(json.dumps(result))
    spawned_rank.leave()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD, join=True)
    print((Path(sys.argv[2]) / "result.json").read_text())
