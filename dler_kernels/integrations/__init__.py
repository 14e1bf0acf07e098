"""Drop-in use of the fused kernels inside RL libraries that users already run.

* ``dler_kernels.integrations.trl``: ``DLERGRPOTrainer``, TRL's ``GRPOTrainer`` with its loss computed by
  ``linear_policy_loss`` from the hidden states (no logits).
* ``dler_kernels.integrations.verl``: a policy loss of verl's registry per objective (``"dler"``, ``"dler_gspo"``,
  ...) and the ``"dler"`` fused-kernel backend of verl's actor (log-probs and entropy from the hidden states).

Each module imports its library; importing this package imports neither.
"""

from __future__ import annotations

import warnings

from packaging.version import InvalidVersion, Version


def warn_if_untested(package: str, version: str, tested: tuple[str, str]) -> bool:
    """Warn when ``version`` lies outside ``[tested[0], tested[1])``: the integration reads
    the library's internals, which move between releases. Returns whether the version is inside."""
    low, high = tested
    try:
        inside = Version(low) <= Version(version) < Version(high)
    except InvalidVersion:
        inside = False
    if not inside:
        warnings.warn(
            f"dler_kernels.integrations: {package} {version} is outside the tested versions "
            f"(>={low}, <{high}); the integration reads {package}'s internals and may compute a different loss. "
            f"Run tests/integrations/test_{package}.py against this version before training with it.",
            UserWarning,
            stacklevel=3,
        )
    return inside
