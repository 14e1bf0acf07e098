"""Public API of the logits path: ``policy_loss`` and ``token_logprobs``.

Semantics: ``dler_kernels.reference`` (module docstring). These functions check their
arguments (the one validator of every backend: ``loss_inputs``), then hand them to the backend
``dispatch.select_backend`` chooses: the fused Triton kernel, the C++/CUDA kernels of the extension
``dler_kernels._C``, or the plain-torch reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference as ref
from .dispatch import select_backend
from .loss_inputs import check_token_data, loss_options, with_loss_options
from .objective_path import policy_loss_two_pass
from .validate import check_number, check_target_probability, check_targets, check_tensor, token_ids


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. logits
    per_token_loss: torch.Tensor  # [N] float32, 0 on masked rows (detached)
    logprobs: torch.Tensor  # [N] float32 log-prob of each target at the temperature (detached)
    entropy: torch.Tensor  # [N] float32 entropy of each row's distribution (detached)
    metrics: dict[str, torch.Tensor]  # 0-d tensors; see reference.policy_metrics_ref


def _check_logits(logits) -> int:
    check_tensor("logits", logits, ndim=2, kind="float")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one column (the vocab size V), got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in the vocab dimension (stride(-1) == 1); call .contiguous()")
    return logits.shape[0]


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str | None = None,
):
    """Log-prob of each target under ``softmax(logits / temperature)``, in float32, without gradient.

    ``logits`` [N, V], ``targets`` [N] (any integer dtype); a negative target marks a padding row (log-prob 0).
    A -inf logit (a masked vocabulary) has probability 0 and adds nothing to the entropy; a row whose target
    has probability 0 (its logit, or every logit of the row, is -inf) is a ValueError naming the row
    (``dler_kernels.reference``). Returns ``logprobs`` [N], or ``(logprobs, entropy)`` with
    ``return_entropy``. ``backend``: ``"triton"``, ``"cpu"``, ``"cuda"`` or ``"reference"`` (default: see
    ``dler_kernels.dispatch``).
    """
    n = _check_logits(logits)
    check_tensor("targets", targets, ndim=1, kind="int", device=logits.device, length=n)
    targets = token_ids(targets)
    check_number("temperature", temperature, low=0.0, low_open=True)
    valid = targets >= 0
    check_targets(targets, valid, logits.shape[1])
    chosen = select_backend(logits, backend)
    with torch.no_grad():
        logp, entropy = chosen.token_logprobs(logits, targets, temperature, return_entropy)
    check_target_probability(logp, valid, targets)
    return (logp.float(), entropy.float()) if return_entropy else logp.float()


@with_loss_options
def policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    inplace_grad: bool = False,
    backend: str | None = None,
    **options,
) -> PolicyLossOutput:
    """The policy loss of an objective (default: PPO-clip with clip-higher and the dual clip), with KL to a
    reference and an entropy bonus, from the logits.

    Packed inputs: ``logits`` [N, V]; ``targets``, ``old_logprobs``, ``advantages``, ``mask``
    (and ``ref_logprobs``, ``seq_ids``) [N]. ``options`` are the fields of ``loss_inputs.LossOptions`` (each
    documented there; the signature lists them): ``objective`` (``dler_kernels.objectives``) and its parameters
    (``eps_low``, ``eps_high``, ``clip_c``, ... None: the objective's default), ``beta``, ``kl_type``,
    ``entropy_coef``, ``temperature``, ``loss_agg``, ``normalizer`` (replaces the local denominator: token count
    for ``token-mean``, sequence count for ``seq-mean-*``, with a global one, so that gradient accumulation and
    data parallelism equal one big batch) and ``norm_length`` (the constant of ``seq-mean-token-sum-norm``,
    Dr.GRPO's max response length). ``seq_ids`` is needed by the ``seq-mean-*`` aggregations and the
    sequence-level objectives. ``token_weights`` [N] (float, no gradient) multiply each token's loss before the
    aggregation, e.g. truncated importance-sampling weights of a rollout engine; ``per_token_loss`` is returned
    without them. ``inplace_grad``: the gradient overwrites the logits on every backend (saves an N x V buffer,
    except on the reference, which works on a copy; the logits are lost). ``backend``:
    ``"triton"``, ``"cpu"``, ``"cuda"`` or ``"reference"`` (default: see ``dler_kernels.dispatch``).

    The token-local objectives with a kernel code (``ppo_clip``, ``cispo``, ``sapo``, ``dppo_tv``, ``dppo_kl``)
    run in one fused pass over the logits, unless OPSM's sequence mask is on. Every other objective runs in two
    (``dler_kernels.objective_path``): the backend's log-prob kernel, the objective on the [N] log-probs, the
    backend's gradient kernel.

    Input rules, the same on every backend (the reference included), each a ``ValueError`` naming the
    argument before any kernel runs:

    * Only ``logits`` are differentiated. ``old_logprobs``, ``advantages``, ``ref_logprobs``,
      ``token_weights`` and ``mask`` are data: one that requires grad (with grad mode on) is refused, not
      silently left without a gradient. The clipped surrogate treats the old policy's log-probs and the
      advantages as constants (PPO, GRPO, verl and TRL all detach them); a graph-attached advantage is
      almost always a forgotten ``.detach()`` (e.g. a critic's baseline), and letting the actor loss
      push gradient into it would be wrong, so the fix is the caller's ``.detach()``.
    * ``mask``: bool, or numbers exactly 0 or 1 (0.5, 2 or NaN are refused; weights go in
      ``token_weights``). ``targets``: integers (any integer dtype but uint64) in [0, V) on valid rows.
      ``logits``: V >= 1 columns.
    * ``logits`` may hold -inf (a masked vocabulary: padded vocab, logits processors): probability 0, nothing
      added to the entropy, gradient exactly 0. A valid row whose target has probability 0 (its logit is
      -inf, or every logit of the row is) is a ValueError naming ``logits`` and the first such row, raised
      after the kernel from the log-probs it returns (with ``inplace_grad`` the logits already hold the
      gradient then). A NaN or +inf logit is not refused: it gives a non-finite loss (metric ``num_nonfinite``).
    * ``old_logprobs``, ``advantages``, ``token_weights`` (and ``ref_logprobs`` when ``beta != 0``)
      are finite on valid rows; masked rows may hold anything.
    * An unknown option, or an objective parameter the objective does not read, names itself.
    * N = 0 tokens: empty per-token outputs, loss 0, an empty gradient.
    """
    n = _check_logits(logits)
    options = loss_options(options)
    data = check_token_data(
        n, logits.shape[1], logits.device, targets, old_logprobs, advantages, mask, options,
        ref_logprobs=ref_logprobs, seq_ids=seq_ids, token_weights=token_weights,
    )  # fmt: skip
    chosen = select_backend(logits, backend)
    if options.fused or chosen.name == "reference":
        loss, per_token, logp, entropy, kl = chosen.policy_loss(logits, data, options, inplace_grad)
    else:
        loss, per_token, logp, entropy, kl = policy_loss_two_pass(chosen, logits, data, options, inplace_grad)
    check_target_probability(logp, data.valid, data.targets)
    metrics = loss_metrics(logp, entropy, data, options, kl, per_token)
    return PolicyLossOutput(loss.float(), per_token.float(), logp.float(), entropy.float(), metrics)


def loss_metrics(logp, entropy, data, options, kl, per_token) -> dict[str, torch.Tensor]:
    """``reference.policy_metrics_ref`` of a call, with the objective's clip bounds."""
    with torch.no_grad():
        return ref.policy_metrics_ref(
            logp, data.old_logprobs, data.advantages, entropy, data.valid, options.eps_low, options.eps_high,
            options.clip_c if "clip_c" in options.objective_spec.defaults else None, kl, per_token,
        )  # fmt: skip
