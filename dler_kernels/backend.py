"""The interface every backend implements: ``Backend`` (what the logits and fused-linear paths call)
and ``AdvantagesBackend`` (the advantage computation, on the backends that have it).

Implementations: ``torch_backend.TorchBackend`` (``reference``), ``triton_backend.TritonBackend``
(``triton``), ``ext_backend.ExtensionBackend`` (``cpu`` and ``cuda``); ``dispatch`` picks one per call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .loss_inputs import LossOptions, TokenData

# The default buffer of the fused-linear path (chunk_size * V elements): 2**26 on a GPU (128 MiB in bf16;
# 2.7% of the bf16 logits at N=16384, V=151936). On a CPU a chunk that stays in cache is faster, and the
# plain-torch backend holds about four float32 copies of a chunk (the buffer, log-probs, probabilities, one
# temporary): 2**20 (bench/bench_linear_policy_loss.py on the CPU, 2026-11-21: 16 rows beat 128 at V=32000).
DEFAULT_SLAB_ELEMENTS = 1 << 26
TORCH_SLAB_ELEMENTS = 1 << 20


class Backend(ABC):
    """One implementation of the loss kernels. Arguments are already checked by the public ops; every
    vector a method returns is in the accumulation dtype (``reference.accumulation_dtype``) or float32."""

    name: str  # as ``backend=`` and ``DLER_BACKEND`` spell it
    chunk_elements: int  # default size of the fused-linear path's buffer, in elements

    @abstractmethod
    def token_logprobs(self, logits, targets, temperature: float, return_entropy: bool):
        """(logp, entropy or None) of each row, without gradient; a negative target marks a padding row (0)."""

    @abstractmethod
    def policy_loss(self, logits, data: TokenData, options: LossOptions, inplace_grad: bool):
        """The logits path: (loss, per_token, logp, entropy, kl or None); ``loss`` differentiable w.r.t.
        ``logits`` when autograd asks for it; with ``inplace_grad`` the gradient overwrites the logits."""

    @abstractmethod
    def rows(self, z, data: TokenData, weights, options: LossOptions, want_grad: bool, want_state: bool):
        """The fused-linear row pass over one chunk of logits ``z`` [rows, V] (``data`` and the aggregation
        ``weights`` of those rows): (per_token, logp, entropy, kl or None, (lse, dlogp, dent) or None). With
        ``want_grad`` z is overwritten by d(loss)/d(z); ``want_state`` asks for the row state the vocab pass
        (``slab_grad_``) needs: log-sum-exp, d(loss)/d(log-prob), d(loss)/d(entropy)."""

    @abstractmethod
    def slab_grad_(self, z, targets, valid, lse, entropy, dlogp, dent, col0: int, temperature: float) -> None:
        """In place: ``z`` (logits of the vocab columns col0 .. of some rows) becomes d(loss)/d(z), from
        those rows' state (a negative or out-of-slab target contributes no one-hot term)."""


class AdvantagesBackend(ABC):
    """One implementation of the advantage computation (``reference.compute_advantages_ref``)."""

    name: str

    @abstractmethod
    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor, **options):
        """(values, keep, stats) on checked arguments; ``options``: those of ``compute_advantages``."""
