"""The ``triton`` backend: the fused Triton kernels (``triton_policy_loss``, ``triton_advantages``) as one
object implementing ``Backend`` and ``AdvantagesBackend``. CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``. Importing this module imports triton."""

from __future__ import annotations

import torch

from .backend import DEFAULT_SLAB_ELEMENTS, AdvantagesBackend, Backend
from .stored_grad import StoredGradLoss
from .triton_advantages import triton_advantages
from .triton_policy_loss import launch_rows, slab_grad_, triton_token_logprobs


def _kernel_options(options) -> dict:
    """The loss options as the row kernel's launch wrapper takes them."""
    return dict(temperature=options.temperature, **options.fused_args())


class TritonBackend(Backend, AdvantagesBackend):
    name = "triton"
    chunk_elements = DEFAULT_SLAB_ELEMENTS

    def token_logprobs(self, logits, targets, temperature, return_entropy):
        return triton_token_logprobs(logits, targets, temperature)

    def policy_loss(self, logits, data, options, inplace_grad):
        """The row kernel writes the gradient (into the logits with ``inplace_grad``) while it computes the
        loss; the aggregation weights are float32 whatever the logits dtype (the kernel's arithmetic)."""
        valid = data.valid
        weights = data.aggregation_weights(options)
        targets = torch.where(valid, data.targets, 0).contiguous()  # masked rows may carry -100, never read
        old, adv = data.old_logprobs.contiguous(), data.advantages.contiguous()
        ref_lp = data.ref_logprobs.contiguous() if data.ref_logprobs is not None else None
        kernel_options = _kernel_options(options)

        def kernel(z, grad):
            logp, entropy, per_token, kl = launch_rows(
                z, targets, valid, old=old, adv=adv, ref_lp=ref_lp, weights=weights, grad=grad, compute_loss=True,
                **kernel_options,
            )  # fmt: skip
            return per_token, logp, entropy, kl

        if inplace_grad or (torch.is_grad_enabled() and logits.requires_grad):
            return StoredGradLoss.apply(logits, weights, kernel, inplace_grad)
        per_token, logp, entropy, kl = kernel(logits, None)
        return (per_token * weights).sum(), per_token, logp, entropy, kl

    def rows(self, z, data, weights, options, want_grad, want_state):
        n = z.shape[0]
        state = tuple(torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(3)) if want_state else None
        logp, entropy, per_token, kl = launch_rows(
            z, torch.where(data.valid, data.targets, 0), data.valid, old=data.old_logprobs, adv=data.advantages,
            ref_lp=data.ref_logprobs, weights=weights, grad=z if want_grad else None, compute_loss=True,
            row_state=state, **_kernel_options(options),
        )  # fmt: skip
        return per_token, logp, entropy, kl, state

    def slab_grad_(self, z, targets, valid, lse, entropy, dlogp, dent, col0, temperature):
        slab_grad_(z, targets, valid.to(torch.int8), lse, entropy, dlogp, dent, col0, temperature)

    def advantages(self, rewards, group_ids, **options):
        return triton_advantages(rewards, group_ids, **options)
