"""The numbers of ``dler eval``: pass@k (the unbiased estimator of Chen et al. 2021), majority vote, and the
summary of one (model, data set) from its samples and their correctness."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, c of them correct,
    is correct: 1 - C(n-c, k) / C(n, k), as a product so that large n neither overflows nor cancels."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_vote(answers: Sequence[str | None], correct: Sequence[float]) -> float:
    """1.0 when the most frequent extracted answer is a correct one. Answers are compared after dropping
    whitespace; a tie goes to the answer seen first; samples without an answer do not vote."""
    keys = ["".join(a.split()) if a is not None else None for a in answers]
    counts = Counter(k for k in keys if k)
    if not counts:
        return 0.0
    best = max(counts.values())
    winner = next(k for k in keys if k and counts[k] == best)
    return float(max(c for k, c in zip(keys, correct) if k == winner))


def default_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to ``samples``, and ``samples`` itself."""
    ks = [1 << i for i in range(samples.bit_length()) if 1 << i <= samples]
    return ks if ks[-1] == samples else [*ks, samples]


def pass_at_k_mean(counts: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over questions, the i-th with ``counts[i]`` of its ``n`` samples correct."""
    return mean([pass_at_k(n, c, k) for c in counts])


def mean(values) -> float:
    """The mean of ``values`` (any iterable), 0.0 when there are none."""
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def summarise(
    groups: list[list[dict]], correct: list[list[float]], answers: list[list[str | None]], ks: Sequence[int], seconds
) -> dict:
    """The metrics of one (model, data set) from its per-question samples and their correctness."""
    n = len(groups[0])
    lengths = sorted(r["tokens"] for g in groups for r in g)
    flat = [c for cs in correct for c in cs]
    metrics = {
        "questions": len(groups),
        "samples_per_question": n,
        "pass@1": mean(flat),
        "pass@k": {str(k): pass_at_k_mean([int(sum(c)) for c in correct], n, k) for k in ks},
        "majority": mean(majority_vote(a, c) for a, c in zip(answers, correct)),
        "mean_length": mean(lengths),
        "median_length": float(lengths[len(lengths) // 2]),
        "p90_length": float(lengths[min(len(lengths) - 1, math.ceil(0.9 * len(lengths)) - 1)]),
        "truncation_rate": mean(r["finish_reason"] == "length" for g in groups for r in g),
        "generate_seconds": round(seconds, 3),
        "tokens_per_second": round(sum(lengths) / seconds, 1) if seconds > 0 else None,
    }
    think = [r["think_tokens"] for g in groups for r in g if r.get("think_tokens") is not None]
    if think:
        metrics["forced_rate"] = mean(r["forced"] for g in groups for r in g)
        metrics["mean_think_tokens"] = mean(think)
        metrics["max_think_tokens"] = max(think)
    return metrics
