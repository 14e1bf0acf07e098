"""dler_kernels: fused kernels for length-penalised RL of reasoning models.

Depends on torch (and numpy); uses triton where it is installed, else the plain-torch
references in ``dler_kernels.reference``. ``python -m dler_kernels.info`` lists the backends.
"""

from .advantages import Advantages, compute_advantages
from .dispatch import HAS_TRITON, available_backends, backend_for
from .linear_policy_loss import linear_policy_loss, linear_token_logprobs
from .policy_loss import PolicyLossOutput, policy_loss, token_logprobs

__all__ = [
    "HAS_TRITON",
    "Advantages",
    "PolicyLossOutput",
    "available_backends",
    "backend_for",
    "compute_advantages",
    "linear_policy_loss",
    "linear_token_logprobs",
    "policy_loss",
    "token_logprobs",
]
__version__ = "0.1.0"
