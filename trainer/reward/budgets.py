"""Per-prompt length budgets, the ``budget`` a length penalty judges a group against: DA-DLER's from each
prompt's difficulty (:class:`DifficultyBudgets`), DRQA's from its data file (:class:`ConciseLengths`), and a
budget that shrinks during training (:class:`BudgetSchedule`, over either of them or the fixed budget:
:class:`ScheduledBudgets`). All answer ``observe(prompt_id, correct, step)`` with the prompt's budget and save
their state with checkpoints; the dynamic sampler asks them, and uses ``max_budget`` as what rollouts must
reach."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fsutil import UserError

# The labels of a DRQA data file's chains (``dler drqa-data`` writes them, :class:`ConciseLengths` reads them).
LABELS = ("correct-concise", "correct-verbose", "wrong")


@dataclass
class DifficultyBudgets:
    """DA-DLER: a prompt's budget from its group's correctness ratio c.

    ``thresholds`` d_1 < ... < d_k and ``budgets`` l_0..l_k: the budget is l_j where j is the
    number of thresholds with c >= d_j, so a harder prompt (lower c) keeps a longer budget.
    Paper: thresholds (0.5,), budgets (4000, 2000). ``source`` "current" judges a prompt by this
    step's group; "previous" by the group seen the last time it was drawn (the current group
    for a prompt never seen before). The record persists across steps and into checkpoints.
    """

    thresholds: tuple[float, ...] = (0.5,)
    budgets: tuple[int, ...] = (4000, 2000)
    source: str = "current"
    record: dict[str, tuple[float, int]] = field(default_factory=dict)  # prompt id -> (ratio, step seen)

    def __post_init__(self):
        self.thresholds = tuple(float(x) for x in self.thresholds)
        self.budgets = tuple(int(x) for x in self.budgets)
        if len(self.budgets) != len(self.thresholds) + 1:
            raise ValueError(
                f"budgets needs one entry more than thresholds (got {len(self.budgets)} budgets for "
                f"{len(self.thresholds)} thresholds)"
            )
        if any(not 0 < d <= 1 for d in self.thresholds) or list(self.thresholds) != sorted(set(self.thresholds)):
            raise ValueError(f"thresholds must be strictly increasing in (0, 1], got {self.thresholds}")
        if any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be >= 1 token, got {self.budgets}")
        if self.source not in ("current", "previous"):
            raise ValueError(f"source must be 'current' or 'previous', got {self.source!r}")

    @property
    def max_budget(self) -> int:
        """What rollouts must generate up to."""
        return max(self.budgets)

    def budget_for_ratio(self, ratio: float) -> int:
        return self.budgets[sum(ratio >= d for d in self.thresholds)]

    def observe(self, prompt_id: str, correct: Sequence[float], step: int) -> int:
        """Record this step's group of ``prompt_id`` and return the budget its penalty uses."""
        ratio = float(np.mean(correct)) if len(correct) else 0.0
        previous = self.record.get(prompt_id)
        self.record[prompt_id] = (ratio, step)
        if self.source == "previous" and previous is not None:
            ratio = previous[0]
        return self.budget_for_ratio(ratio)

    def state_dict(self) -> dict:
        return {"record": {k: list(v) for k, v in self.record.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.record = {k: (float(r), int(s)) for k, (r, s) in state["record"].items()}


class ConciseLengths:
    """Per-prompt length budgets for the ``drqa`` reward: the median tokens of a question's correct-concise
    chains in a DRQA data file, matched to the training examples by question text. Questions without a
    concise chain keep ``default`` (the penalty's ``length_budget``). Same interface as DA-DLER's budgets."""

    def __init__(self, lengths: Mapping[str, int], default: int):
        self.lengths, self.default = dict(lengths), int(default)

    @classmethod
    def from_file(cls, path: str | Path, examples: Sequence, default: int) -> ConciseLengths:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"DRQA data {path} not found; build it with `dler drqa-data`")
        by_question: dict[str, list[int]] = {}
        for line_no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if rec["label"] not in LABELS:
                    raise ValueError(f"unknown label {rec['label']!r}")
                if rec["label"] == "correct-concise":
                    by_question.setdefault(rec["question"], []).append(int(rec["tokens"]))
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{line_no}: not a DRQA record ({type(e).__name__}: {e})") from None
        lengths = {
            ex.id: min(default, max(1, round(statistics.median(by_question[ex.question]))))
            for ex in examples
            if ex.question in by_question
        }
        if not lengths:
            raise UserError(f"{path} has no correct-concise chain for any training question: nothing to reward")
        return cls(lengths, default)

    @property
    def max_budget(self) -> int:
        return self.default

    def observe(self, prompt_id: str, correct, step: int) -> int:
        return self.lengths.get(prompt_id, self.default)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Nothing to restore: the lengths come from the data file."""


@dataclass
class BudgetSchedule:
    """A budget that shrinks stepwise during training: B(t) = max(B_min, round(B * decay^floor((t-1) / every))).

    ThinkPrune (Hou et al. 2025, arXiv 2504.01296, "iterative length pruning") trains in rounds, each with a
    tighter token limit; "Train Long, Think Short" (Hammoud et al. 2025, arXiv 2508.08940, its exponential decay
    schedule) uses B(t) = max(1, B0 gamma^floor(t/T)). Trainer steps count from 1, so
    t - 1 takes the place of t: the first T steps keep B0. ``B`` is the budget the prompt
    has without a schedule (the penalty's ``length_budget``, or its DA-DLER / DRQA budget), so a schedule
    scales every per-prompt budget by the same factor and keeps their ratios; ``min_budget`` is the floor.
    The budget is a function of the step alone, so a resumed run (which restarts at its checkpoint's step)
    continues the schedule where it was, with no state of its own to save.
    """

    decay: float = 0.75
    """gamma in (0, 1]: the factor each stage multiplies the budget by."""
    every: int = 50
    """T, the steps of one stage (the budget changes after steps T, 2T, ...)."""
    min_budget: int = 1
    """B_min, the floor in tokens."""

    def __post_init__(self):
        if not 0 < self.decay <= 1:
            raise ValueError(f"budget schedule decay must be in (0, 1], got {self.decay}")
        if self.every < 1:
            raise ValueError(f"budget schedule every must be >= 1 step, got {self.every}")
        if self.min_budget < 1:
            raise ValueError(f"budget schedule min_budget must be >= 1 token, got {self.min_budget}")

    def budget(self, base: int, step: int) -> int:
        """The budget at ``step`` (counted from 1, as the trainer's steps) of a prompt whose unscheduled budget is
        ``base``; step t uses stage floor((t - 1) / every), so the first ``every`` steps keep ``base``."""
        stage = max(step - 1, 0) // self.every
        return max(self.min_budget, round(base * self.decay**stage))


class ScheduledBudgets:
    """The per-prompt budgets of ``inner`` (DA-DLER, DRQA; None: every prompt gets ``default``) under a
    :class:`BudgetSchedule`. Same interface as the budgets it wraps; its checkpoint state is theirs."""

    def __init__(self, schedule: BudgetSchedule, inner=None, default: int = 4000):
        if default < 1:
            raise ValueError(f"default budget must be >= 1 token, got {default}")
        self.schedule, self.inner, self.default = schedule, inner, int(default)

    @property
    def max_budget(self) -> int:
        """What rollouts must generate up to: the unscheduled largest (the schedule only shrinks budgets)."""
        return self.inner.max_budget if self.inner is not None else self.default

    def observe(self, prompt_id: str, correct: Sequence[float], step: int) -> int:
        base = self.inner.observe(prompt_id, correct, step) if self.inner is not None else self.default
        return self.schedule.budget(base, step)

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: Mapping) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state)
