"""The policy objectives, one file each, and their registry.

Each objective is written once, as a differentiable function of [N] vectors (``base.Objective``): the reference
uses it directly (autograd through the logits), and every backend uses the same function on the log-probs its
kernels compute, turning d(loss)/d(log-prob) into d(loss)/d(logits) with its slab kernel (``objective_path``).
The token-local objectives (a token's loss depends on its own log-prob only: ``ppo_clip``, ``cispo``, ``sapo``,
``dppo_tv``, ``dppo_kl``) also have a fused one-pass kernel on every backend, which computes the same formula
(``Objective.kernel_code``; ``csrc/policy_loss_math.h``, ``triton_policy_loss.py``); the tests compare both with
this definition.

======================  =============================================================  ============================
name                    what it is                                                     parameters (defaults)
======================  =============================================================  ============================
``ppo_clip``            PPO's clipped ratio, clip-higher, dual clip (DLER's default)   eps_low 0.2, eps_high 0.28,
                                                                                       clip_c 10
``gspo``                GSPO, the clip on the sequence ratio (TRL's sequence level)    eps_low 3e-4, eps_high 4e-4
``gspo_token``          GSPO-token (verl's ``gspo``)                                   eps_low 3e-4, eps_high 4e-4
``cispo``               CISPO, REINFORCE with a clipped stop-gradient ratio            eps_low 0.2, eps_high 0.28,
                                                                                       cispo_clip "both"
``sapo``                SAPO, a soft sigmoid gate in place of the clip                 tau_pos 1.0, tau_neg 1.05
``gmpo``                GMPO, the geometric mean of clipped token ratios               eps_low 0.4, eps_high 0.4
``dppo_tv``             DPPO with the total-variation mask                             eps_low 0.2, eps_high 0.2,
                                                                                       ratio_cap 20
``dppo_kl``             DPPO with the binary-KL mask                                   eps_low 0.2, eps_high 0.2,
                                                                                       ratio_cap 20
``vespo``               VESPO, REINFORCE weighted by a smooth function of the          vespo_k_pos 2,
                        sequence's importance weight                                   vespo_lambda_pos 3,
                                                                                       vespo_k_neg 3,
                                                                                       vespo_lambda_neg 2
``luspo``               LUSPO, GSPO's sequence loss scaled by the sequence's length    eps_low 3e-4, eps_high 4e-4
======================  =============================================================  ============================

OPSM, the off-policy sequence mask (``opsm_threshold`` of ``LossSettings``), composes with every objective.

A parameter left None takes the objective's default; one the objective does not read is an error naming both.
A new objective is one file here (its ``Objective``) plus its line in ``OBJECTIVES`` and its tests.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..validate import check_choice, check_name, check_number
from .base import LOG_RATIO_CLAMP, Objective, Sequences, dense_ids
from .cispo import CISPO, CISPO_CLIPS
from .dppo import DPPO_KL, DPPO_TV
from .gmpo import GMPO
from .gspo import GSPO, GSPO_TOKEN
from .luspo import LUSPO
from .ppo_clip import PPO_CLIP
from .sapo import SAPO
from .vespo import VESPO

OBJECTIVES: dict[str, Objective] = {
    o.name: o for o in (PPO_CLIP, GSPO, GSPO_TOKEN, CISPO, SAPO, GMPO, DPPO_TV, DPPO_KL, VESPO, LUSPO)
}
DEFAULT_OBJECTIVE = "ppo_clip"
# Every parameter an objective may read. clip_c keeps its meaning of before the objectives: PPO-clip's dual clip,
# 10 unless given, None turning it off; so only a clip_c other than those two is refused for another objective.
PARAMETERS = (
    "eps_low", "eps_high", "clip_c", "ratio_cap", "tau_pos", "tau_neg", "cispo_clip",
    "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
)  # fmt: skip
CLIP_C_DEFAULT = PPO_CLIP.defaults["clip_c"]

__all__ = ["DEFAULT_OBJECTIVE", "LOG_RATIO_CLAMP", "OBJECTIVES", "PARAMETERS", "Objective", "Sequences",
           "dense_ids", "get_objective", "resolve"]  # fmt: skip


def get_objective(name: str) -> Objective:
    """The objective ``name``; an unknown name is a ValueError listing the choices (and the closest one)."""
    check_name("objective", name, OBJECTIVES)
    return OBJECTIVES[name]


def resolve(name: str, given: Mapping[str, object]) -> dict[str, object]:
    """The parameters objective ``name`` reads, each the value in ``given`` or (None there) its default, checked.
    A parameter in ``given`` that is not None and that the objective does not read is a ValueError naming both."""
    objective = get_objective(name)
    for key, value in given.items():
        if key not in PARAMETERS:
            raise ValueError(f"unknown objective parameter {key!r}; the parameters are {', '.join(PARAMETERS)}")
        unused = key not in objective.defaults and value is not None
        if unused and not (key == "clip_c" and value == CLIP_C_DEFAULT):
            readers = [o.name for o in OBJECTIVES.values() if key in o.defaults]
            raise ValueError(
                f"{key}={value!r} means nothing for objective={name!r}: {key} is read by {', '.join(readers)}"
            )
    params = {}
    for key, default in objective.defaults.items():
        value = given.get(key, default)
        params[key] = default if value is None and key != "clip_c" else value
    _check(params)
    return params


def _check(params: dict) -> None:
    if "eps_low" in params:
        check_number("eps_low", params["eps_low"], low=0.0, high=1.0)
    if "eps_high" in params:
        check_number("eps_high", params["eps_high"], low=0.0)
    if "clip_c" in params:
        check_number("clip_c", params["clip_c"], low=1.0, low_open=True, allow_none=True)
    if "ratio_cap" in params:
        check_number("ratio_cap", params["ratio_cap"], low=0.0, low_open=True)
    for key in ("tau_pos", "tau_neg"):
        if key in params:
            check_number(key, params[key], low=0.0, low_open=True)
    for key in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
        if key in params:
            check_number(key, params[key], low=0.0)
    if "cispo_clip" in params:
        check_choice("cispo_clip", params["cispo_clip"], CISPO_CLIPS)
