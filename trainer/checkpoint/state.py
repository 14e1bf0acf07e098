"""A run's distributed state gathered to rank 0 for a save and spread back at a load: the full model and
optimizer state dicts (FSDP2 shards or a plain module alike) and every rank's random generator states."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping

from ..dist import collective
from ..fsutil import UserError

logger = logging.getLogger("trainer.checkpoint")


def gather_model(model) -> dict:
    """Full, unsharded weights on rank 0's CPU ({} on the other ranks). Works for FSDP2 (DTensor
    parameters, collective) and for plain modules without a process group alike."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if collective.rank() == 0:
        logger.info("gathering model weights")
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_optimizer(model, optimizer) -> tuple[dict, bool]:
    """Full optimizer state keyed by parameter name on rank 0, and whether the optimizer is fresh.

    A fresh optimizer (no step taken yet) has no state to gather, only hyperparameters; it is not
    passed to ``get_optimizer_state_dict``, which would initialise it by running a step with lr 0 and
    leave a step count of 1 behind, changing the bias correction of every later update.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if len(optimizer.state) == 0:
        return {"param_groups": [_hyperparameters(group) for group in optimizer.param_groups]}, True
    if collective.rank() == 0:
        logger.info("gathering optimizer state")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options), False


def _hyperparameters(group: Mapping) -> dict:
    return {key: value for key, value in group.items() if key != "params"}


def set_hyperparameters(optimizer, groups: list[dict]) -> None:
    """Restore the hyperparameters of a checkpoint saved before the optimizer's first step."""
    if len(groups) != len(optimizer.param_groups):
        raise UserError(
            f"the checkpoint's optimizer has {len(groups)} parameter groups, this one {len(optimizer.param_groups)}; "
            "resume with the optimizer configuration it was saved with"
        )
    optimizer.state.clear()
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(_hyperparameters(saved))


def set_model(model, weights: dict) -> None:
    """Load full weights (rank 0's) into ``model``, re-sharding them to its FSDP2 layout if it has one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=collective.is_distributed())
    set_model_state_dict(model, weights, options=options)


def set_optimizer(model, optimizer, state_dict: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=collective.is_distributed())
    set_optimizer_state_dict(model, optimizer, state_dict, options=options)


def _rng_state() -> dict:
    """This process's generator states, in types that ``torch.load(weights_only=True)`` accepts."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        # The current device's only: each rank owns one device, and touching the others would
        # create a CUDA context on every GPU from every rank.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def gather_rng() -> list[dict] | None:
    """Every rank's generator states, on rank 0 (ranks draw differently, e.g. dropout on other data)."""
    state = _rng_state()
    if not collective.is_distributed():
        return [state]
    import torch.distributed as dist

    states = [None] * collective.world_size() if collective.rank() == 0 else None
    dist.gather_object(state, states, dst=0)
    return states


def restore_rng(states: list[dict]) -> None:
    import numpy as np
    import torch

    rank = collective.rank()
    if rank >= len(states):
        logger.warning("checkpoint has RNG states for %d ranks; rank %d keeps its own generators", len(states), rank)
        return
    state = states[rank]
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
