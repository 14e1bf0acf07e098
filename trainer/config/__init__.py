"""The trainer's configuration: one :class:`TrainConfig` describes a run completely.

It is built by :func:`load_config` from a preset (``configs/<name>.yaml`` in the repository, or any YAML
file), which may ``inherit:`` another preset, and then the command line's ``section.key=value`` overrides;
:func:`save_config` writes the fully resolved result into the run folder, so that every run carries the
exact record it was trained with and ``load_config`` on that file gives the same config back.

Errors: what a user wrote (a preset, a YAML file, an override, a dict given to :func:`from_dict`) is reported
as :class:`~trainer.fsutil.UserError` naming the dotted key; building the dataclasses directly in Python with
bad values raises ``ValueError``, the convention of the rest of ``trainer``.

The modules, one job each: ``schema`` (the dataclasses), ``coerce`` (plain data checked and built into
them), ``yaml_text`` (strict YAML reading, the presets' writing style), ``load`` (presets, inheritance,
overrides), ``save`` (plain data and the run's file), ``describe`` (the run's opening summary).
"""

from .coerce import from_dict
from .describe import describe
from .load import CONFIG_DIR, DEFAULT_PRESET, list_presets, load_config
from .save import save_config, to_dict
from .schema import (
    DEVICES,
    AlgorithmConfig,
    DADLERConfig,
    DataConfig,
    EvalConfig,
    FSDPConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_PRESET",
    "DEVICES",
    "AlgorithmConfig",
    "DADLERConfig",
    "DataConfig",
    "EvalConfig",
    "FSDPConfig",
    "ModelConfig",
    "OptimConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "TrainConfig",
    "describe",
    "from_dict",
    "list_presets",
    "load_config",
    "save_config",
    "to_dict",
]
