"""The seeds of the run's random streams, derived from ``run.seed``: one function per stream.

The values are fixed by what earlier runs drew: changing one changes every figure of a seeded run
(``make demo``), so each constant is named here with the reason it has its value.
"""

from __future__ import annotations

# Seeds stay below 2**31: the engines (vLLM, torch generators) take a non-negative 32-bit int.
SEED_MODULUS = 2**31
# A prime above any step count: runs whose ``run.seed`` differs by one start their step seeds this far
# apart, so two seeds' runs never draw the same rollouts at nearby steps.
RUN_SEED_SPREAD = 1_000_003
# A prime: step k's seed is RUN_SEED_SPREAD * seed + STEP_SEED_STRIDE * k, and the engines seed sample j of
# prompt i with seed + i * n + j, so steps lie further apart than one round's samples.
STEP_SEED_STRIDE = 7919
# The same prime between the sampling rounds of one step (dynamic sampling): a new round draws new samples.
ROUND_SEED_STRIDE = 7919
# The mini-batch order of epoch e shuffles with step_seed * 31 + e: a small prime keeps the epochs of
# one step, and the steps, on separate streams.
EPOCH_SHUFFLE_MULTIPLIER = 31
# The held-out evaluation samples with run.seed + 7 (every evaluation of the run alike): an offset so
# that it does not replay the samples of a training step seeded from run.seed itself.
EVAL_SEED_OFFSET = 7
# Seeds of different ranks lie this far apart: more than the seeds one rank uses in a call (the engines
# seed sample j of prompt i with seed + i * n + j, and each sampling round adds ROUND_SEED_STRIDE).
RANK_SEED_STRIDE = 1 << 24


def step_seed(run_seed: int, step: int) -> int:
    """The seed of training step ``step``: its rollouts and its mini-batch order."""
    return (run_seed * RUN_SEED_SPREAD + step * STEP_SEED_STRIDE) % SEED_MODULUS


def round_seed(seed: int, round_index: int) -> int:
    """The seed of sampling round ``round_index`` of a step seeded ``seed``."""
    return seed + ROUND_SEED_STRIDE * round_index


def epoch_shuffle_seed(step_seed_value: int, epoch: int) -> int:
    """The seed of the mini-batch order of ``epoch`` in the step seeded ``step_seed_value``."""
    return step_seed_value * EPOCH_SHUFFLE_MULTIPLIER + epoch


def eval_seed(run_seed: int) -> int:
    """The seed of the held-out evaluation (before this rank's move, :func:`rank_seed`)."""
    return run_seed + EVAL_SEED_OFFSET


def rank_seed(seed: int, rank: int) -> int:
    """``seed`` moved into ``rank``'s own range, so that ranks sampling their own prompts draw
    independent streams (with one seed, every rank's i-th sample used the same random numbers).
    Rank 0 keeps ``seed``: a single process samples as before."""
    return (seed + rank * RANK_SEED_STRIDE) % SEED_MODULUS
