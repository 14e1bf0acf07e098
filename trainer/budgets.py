"""Per-prompt length budgets, the ``budget`` a length penalty judges a group against: DA-DLER's from each
prompt's difficulty (:class:`DifficultyBudgets`), DRQA's from its data file (:class:`ConciseLengths`).
Both answer ``observe(prompt_id, correct, step)`` with the prompt's budget and save their state with
checkpoints; the dynamic sampler asks them, and uses ``max_budget`` as what rollouts must reach."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .drqa import LABELS
from .fsutil import UserError


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
