"""The ``cpu`` and ``cuda`` backends: the kernels of the extension ``dler_kernels._C`` (``csrc/cpu``,
``csrc/cuda``; custom ops ``torch.ops.dler.*``) as objects implementing ``Backend``. Used only once
``dler_kernels._ext`` has loaded the extension (``dispatch`` checks)."""

from __future__ import annotations

import torch

from . import reference as ref
from .backend import DEFAULT_SLAB_ELEMENTS, TORCH_SLAB_ELEMENTS, Backend
from .stored_grad import StoredGradLoss


def _op_args(data, weights, options) -> tuple[tuple, dict]:
    """The op arguments after the logits (and before write_grad), and the objective's, given by keyword."""
    kl_code = options.kl_code
    f = options.fused_args()
    args = (
        torch.where(data.valid, data.targets, 0), data.valid, data.old_logprobs, data.advantages,
        data.ref_logprobs if kl_code else None, weights, float(options.temperature), float(f["eps_low"]),
        float(f["eps_high"]), None if f["clip_c"] is None else float(f["clip_c"]), float(options.beta),
        kl_code, float(options.entropy_coef),
    )  # fmt: skip
    objective = dict(objective=f["objective_code"], ratio_cap=float(f["ratio_cap"]), tau_pos=float(f["tau_pos"]),
                     tau_neg=float(f["tau_neg"]))  # fmt: skip
    return args, objective


class ExtensionBackend(Backend):
    """The extension's kernels for tensors of ``device_type`` ("cpu" or "cuda", also the backend's name)."""

    def __init__(self, device_type: str):
        self.name = device_type
        # On a CPU a chunk that stays in cache is faster, for the C++ kernels too.
        self.chunk_elements = TORCH_SLAB_ELEMENTS if device_type == "cpu" else DEFAULT_SLAB_ELEMENTS

    def token_logprobs(self, logits, targets, temperature, return_entropy):
        return torch.ops.dler.token_logprobs(logits, targets, float(temperature))

    def policy_loss(self, logits, data, options, inplace_grad):
        """Aggregation weights in the accumulation dtype of the logits; kl None without a KL term (the ops
        return zeros)."""
        weights = data.aggregation_weights(options, ref.accumulation_dtype(logits))
        args, objective = _op_args(data, weights, options)
        if inplace_grad:  # the gradient lands in the logits even when autograd does not ask for it

            def kernel(z, grad):
                return torch.ops.dler.policy_loss_rows_(grad, z, *args, **objective)[:4]

            loss, per_token, logp, entropy, kl = StoredGradLoss.apply(logits, weights, kernel, True)
        else:
            write_grad = torch.is_grad_enabled() and logits.requires_grad
            loss, per_token, logp, entropy, kl = torch.ops.dler.policy_loss(logits, *args, write_grad, **objective)[:5]
        return loss, per_token, logp, entropy, kl if options.beta != 0.0 else None

    def rows(self, z, data, weights, options, want_grad, want_state):
        args, objective = _op_args(data, weights, options)
        state = None
        if want_grad:
            per_token, logp, entropy, kl, lse, dlogp, dent = torch.ops.dler.policy_loss_rows_(z, z, *args, **objective)
            state = (lse, dlogp, dent) if want_state else None
        else:
            _, per_token, logp, entropy, kl, _ = torch.ops.dler.policy_loss(z, *args, False, **objective)
        return per_token, logp, entropy, kl if options.beta != 0.0 else None, state

    def slab_grad_(self, z, targets, valid, lse, entropy, dlogp, dent, col0, temperature):
        torch.ops.dler.slab_grad_(z, targets, valid, lse, entropy, dlogp, dent, int(col0), float(temperature))
