"""The run's held-out evaluation: accuracy and response lengths on ``eval.data`` with the eval sampling
settings, every rank sampling its share; and the ``dler eval`` command that repeats it on a checkpoint."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..data import Prompt
from ..dist import collective
from ..reward.answers import AnswerChecker
from ..rollout.contract import RolloutEngine
from ..seeds import eval_seed, rank_seed
from .step_metrics import percentiles


@dataclass
class EvalResult:
    accuracy: float
    mean_length: float
    p50_length: float
    p90_length: float
    truncation_rate: float
    samples: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class RankEval:
    """One rank's scored samples (gathered from every rank)."""

    correct: list[float]
    lengths: list[int]
    truncated: list[bool]


class HeldOutEval:
    """Evaluates the policy the engine serves now on ``prompts``; ``say`` prints its one-line result."""

    def __init__(
        self,
        cfg: TrainConfig,
        prompts: Sequence[Prompt],
        checker: AnswerChecker,
        engine: RolloutEngine,
        *,
        rank: int,
        world_size: int,
        say: Callable[[str], None],
    ):
        self.cfg, self.prompts, self.checker, self.engine = cfg, list(prompts), checker, engine
        self.rank, self.world_size, self.say = rank, world_size, say

    def __bool__(self) -> bool:
        """Whether the run has held-out data at all."""
        return bool(self.prompts)

    def run(self, label: str) -> EvalResult:
        """Held-out accuracy and response lengths (collective: every rank its share)."""
        e = self.cfg.eval
        started = time.perf_counter()
        mine = self.prompts[self.rank :: self.world_size]
        # Every rank calls generate, with no prompts if its share is empty: engines may step in lockstep.
        outputs = self.engine.generate(
            [p.token_ids for p in mine],
            n=e.samples_per_prompt,
            max_tokens=self.cfg.eval_max_tokens,
            temperature=e.temperature,
            top_p=e.top_p,
            seed=rank_seed(eval_seed(self.cfg.run.seed), self.rank),
        )
        texts = [s.text for group in outputs for s in group]
        golds = [p.example.answer for p, group in zip(mine, outputs) for _ in group]
        correct = self.checker.score(texts, golds) if texts else []
        lengths = [len(s.token_ids) for group in outputs for s in group]
        truncated = [s.finish_reason == "length" for group in outputs for s in group]
        everyone = collective.gather(RankEval(correct, lengths, truncated))
        correct = np.asarray([c for rank in everyone for c in rank.correct], dtype=np.float64)
        lengths = np.asarray([n for rank in everyone for n in rank.lengths], dtype=np.float64)
        truncated = np.asarray([t for rank in everyone for t in rank.truncated], dtype=np.float64)
        p50, p90 = percentiles(lengths)
        result = EvalResult(
            accuracy=float(correct.mean()) if correct.size else 0.0,
            mean_length=float(lengths.mean()) if lengths.size else 0.0,
            p50_length=p50,
            p90_length=p90,
            truncation_rate=float(truncated.mean()) if truncated.size else 0.0,
            samples=int(correct.size),
        )
        self.say(
            f"eval {label}: accuracy {result.accuracy:.1%}, mean length {result.mean_length:.1f} tokens "
            f"(p90 {result.p90_length:.0f}), truncated {result.truncation_rate:.1%} over {result.samples} samples "
            f"[{time.perf_counter() - started:.1f} s]"
        )
        return result

    def command(self, step: int, model: Path, out: Path) -> str:
        """The ``dler eval`` command that evaluates the model of checkpoint ``step`` (folder ``model``) as
        this evaluation does, writing to ``out``."""
        e, d = self.cfg.eval, self.cfg.data
        args = ["dler", "eval", "--model", f"step-{step}={model}", "--data", f"heldout={e.data}"]
        if e.limit is not None:
            args += ["--limit", str(e.limit)]
        args += ["--samples", str(e.samples_per_prompt), "--temperature", str(e.temperature), "--top-p", str(e.top_p)]
        args += ["--max-tokens", str(self.cfg.eval_max_tokens), "--template", d.template, "--scaling-k", "none"]
        if self.cfg.reward.checker in ("math", "exact"):  # the answer check the run's evaluation used
            args += ["--checker", self.cfg.reward.checker]
        args += ["--out", str(out)]
        return shlex.join(args)
