"""Run in a subprocess by tests/integrations/test_fsdp.py: one policy update with FSDP2 on 2 CPU processes (gloo).

Each rank joins the group through ``init_distributed`` (torchrun's environment variables, set here),
loads the tiny model with ``load_policy`` (float32 compute, so that the result can be compared with a
single process to 1e-5) and runs :func:`run_update` on its half of the rows in OUT/case.pt. The test
runs the same :func:`run_update` on all rows in one process without FSDP and compares. Also checked
here, on the sharded models: activation checkpointing gives the same gradients (and does recompute),
and the reference model (``trainable=False``) gives the log-probs the policy gave before its update.
Rank 0 writes OUT/result.pt and prints one JSON object of scalar facts on the last line.

usage: python fsdp_update.py MODEL_DIR OUT PORT
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from trainer.config import FSDPConfig, ModelConfig, OptimConfig
from trainer.dist.distributed_env import destroy_distributed, init_distributed
from trainer.dist.fsdp import load_policy
from trainer.update.optim import build_optimizer, clip_gradients, weight_norm
from trainer.update.packing import UpdateRow
from trainer.update.policy import accumulate_gradients, compute_logprobs

WORLD = 2
FLOAT32 = FSDPConfig(param_dtype="float32", reduce_dtype="float32")  # enabled=None: on with 2 ranks


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (collective for a DTensor)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_grads(model) -> dict[str, torch.Tensor]:
    return {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def rows_of(case: dict, rank: int = 0, world: int = 1) -> tuple[list[UpdateRow], list[torch.Tensor]]:
    """Rank ``rank``'s share of the case's rows (every ``world``-th), and their old log-prob shifts."""
    mine = case["rows"][rank::world]
    return [UpdateRow(r["prompt"], r["response"], r["advantage"]) for r in mine], [r["shift"] for r in mine]


def old_logprobs(model, rows: list[UpdateRow], shifts: list[torch.Tensor], case: dict) -> None:
    """The model's log-probs, shifted so that ratios differ from 1 and both clips engage."""
    temperature = case["loss"]["temperature"]
    logps = compute_logprobs(model, rows, token_budget=case["big_budget"], temperature=temperature)
    for row, logp, shift in zip(rows, logps, shifts):
        row.old_logprobs = logp + shift


def run_update(model, rows: list[UpdateRow], shifts: list[torch.Tensor], case: dict) -> dict:
    """Old log-probs, the loss and gradients with one micro-batch, with as many on each rank (one
    per row) and with a different number on each rank, then clipping and one AdamW step. Every value
    is gathered in full."""
    old_logprobs(model, rows, shifts, case)
    out = {"loss": {}, "grads": {}}
    for budget in (case["big_budget"], case["uneven_budget"], case["small_budget"]):
        model.zero_grad(set_to_none=True)
        out["loss"][budget] = accumulate_gradients(model, rows, case["loss"], token_budget=budget)["loss"]
        out["grads"][budget] = full_grads(model)
    out["norm"] = clip_gradients(model, case["max_norm"])
    out["clipped"] = full_grads(model)
    optimizer = build_optimizer(model, OptimConfig(**case["optim"]))
    optimizer.step()
    out["fused"] = optimizer.defaults["fused"]
    out["params"] = {n: full(p) for n, p in model.named_parameters()}
    out["weight_norm"] = weight_norm(model)
    return out


def layer_calls(model) -> list[int]:
    """A counter of the first decoder layer's MLP computations. It wraps ``forward`` itself: module
    hooks do not run again when the checkpoint recomputes a layer in the backward."""
    calls, mlp = [0], model.model.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    return calls


def worker(rank: int, model_dir: str, out: str, port: str) -> None:
    import spawned_rank  # beside this script; imported here as test_fsdp.py loads this file as a module

    spawned_rank.start()
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    model_dir, out = Path(model_dir), Path(out)
    env = init_distributed("cpu")
    case = torch.load(out / "case.pt", weights_only=True)
    rows, shifts = rows_of(case, rank, WORLD)  # this rank's half

    policy = load_policy(model_dir, ModelConfig(path=str(model_dir)), FLOAT32, env)
    params = list(policy.parameters())
    facts = dict(
        env=[env.rank, env.world_size, env.local_rank, str(env.device), env.is_main],
        backend=dist.get_backend(),
        all_dtensors=all(isinstance(p, DTensor) for p in params),
        local_fraction=sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params),
        tied=policy.lm_head.weight is policy.model.embed_tokens.weight,
    )
    result = run_update(policy, rows, shifts, case)
    before_update = [row.old_logprobs - shift for row, shift in zip(rows, shifts)]

    checkpointed = load_policy(model_dir, ModelConfig(path=str(model_dir), gradient_checkpointing=True), FLOAT32, env)
    calls = layer_calls(checkpointed)
    accumulate_gradients(checkpointed, rows, case["loss"], token_budget=case["big_budget"])
    facts["checkpointed_layer_calls"] = calls[0]  # one micro-batch: forward + recompute
    result["checkpointed_grads"] = full_grads(checkpointed)
    # The fused LM-head path on the sharded model (tied head, uneven micro-batch counts): the same
    # gradients and old log-probs as the logits path.
    checkpointed.zero_grad(set_to_none=True)
    fused_loss = accumulate_gradients(
        checkpointed, rows, case["loss"], token_budget=case["uneven_budget"], fused_head=True
    )["loss"]
    result["fused_grads"] = full_grads(checkpointed)
    temperature = case["loss"]["temperature"]
    fused_rows = [UpdateRow(r.prompt_ids, r.response_ids, r.advantage) for r in rows]
    fused = compute_logprobs(
        checkpointed, fused_rows, token_budget=case["small_budget"], temperature=temperature, fused_head=True
    )
    plain_rows = [UpdateRow(r.prompt_ids, r.response_ids, r.advantage) for r in rows]
    plain = compute_logprobs(checkpointed, plain_rows, token_budget=case["small_budget"], temperature=temperature)
    for fused_row, fused_logp, plain_row, plain_logp in zip(fused_rows, fused, plain_rows, plain):
        fused_row.old_logprobs, plain_row.old_logprobs = fused_logp, plain_logp
    facts["fused_loss"] = fused_loss
    errors = [(a.old_logprobs - b.old_logprobs).abs().max() for a, b in zip(fused_rows, plain_rows) if a.response_ids]
    facts["fused_logprob_error"] = float(max(errors, default=0.0))

    reference = load_policy(model_dir, ModelConfig(path=str(model_dir)), FLOAT32, env, trainable=False)
    ref = compute_logprobs(reference, rows, token_budget=case["big_budget"], temperature=temperature)
    for row, logp in zip(rows, ref):
        row.ref_logprobs = logp
    ref_error = max(float((row.ref_logprobs - want).abs().max()) for row, want in zip(rows, before_update))
    facts.update(
        ref_logprob_error=ref_error,
        ref_training=reference.training,
        ref_requires_grad=any(p.requires_grad for p in reference.parameters()),
        ref_all_dtensors=all(isinstance(p, DTensor) for p in reference.parameters()),
    )
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, facts)
    if rank == 0:
        torch.save(result, out / "result.pt")
        (out / "facts.json").write_text(json.dumps(everyone))
    spawned_rank.leave(destroy_distributed)


if __name__ == "__main__":
    mp.spawn(worker, args=tuple(sys.argv[1:4]), nprocs=WORLD, join=True)
    print((Path(sys.argv[2]) / "facts.json").read_text())
