"""Generation with budget forcing (``dler eval --think-budget``): n responses per prompt from a rollout engine.

Thinking stops at N tokens; if the model has not closed it by then, ``\\n</think>`` and a final-answer cue are
appended and the answer is generated with ``answer_tokens`` more (so a forced response has at most
N + cue + ``answer_tokens`` tokens). A model that closes its thinking itself within N tokens goes on to answer
normally. Either way, at most N tokens are thought.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ThinkBudget:
    """Budget forcing: at most ``tokens`` of thinking, then ``end`` and ``cue``, then ``answer_tokens``."""

    tokens: int
    answer_tokens: int = 64
    end: str = "</think>"
    cue: str = "\n\nFinal answer: \\boxed{"

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"think budget must be >= 1 token, got {self.tokens}")
        if self.answer_tokens < 1:
            raise ValueError(f"answer_tokens must be >= 1, got {self.answer_tokens}")
        if not self.end:
            raise ValueError("the end-of-thinking string must not be empty")

    @property
    def forced_text(self) -> str:
        return f"\n{self.end}{self.cue}"


@dataclass
class Response:
    text: str
    tokens: int  # response tokens, forced ones included
    finish_reason: str  # "stop" or "length" (truncated)
    think_tokens: int | None = None  # with a think budget: tokens generated before the answer phase
    forced: bool = False  # the think budget ran out and the end of thinking was appended


def generate(
    engine,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    think: ThinkBudget | None = None,
) -> list[list[Response]]:
    """``n`` responses per prompt, with budget forcing when ``think`` is given."""
    kw = dict(temperature=temperature, top_p=top_p)
    if think is None:
        groups = engine.generate(list(prompts), n=n, max_tokens=max_tokens, seed=seed, **kw)
        return [[Response(s.text, len(s.token_ids), s.finish_reason) for s in group] for group in groups]
    if think.tokens >= max_tokens:
        raise ValueError(f"think budget ({think.tokens}) must be below max_tokens ({max_tokens})")
    first = engine.generate(list(prompts), n=n, max_tokens=think.tokens, seed=seed, stop=[think.end], **kw)
    forced_ids = tokenizer(think.forced_text, add_special_tokens=False).input_ids
    out = [
        [Response(s.text, len(s.token_ids), s.finish_reason, think_tokens=len(s.token_ids)) for s in group]
        for group in first
    ]
    # The answer phase. Forced samples (out of budget) get the end of thinking, the cue and answer_tokens
    # (outside max_tokens, which bounds thinking and unforced answers); samples that closed their thinking
    # themselves continue with what is left of max_tokens; samples that ended without closing a thought are
    # complete. One engine call per kind; the continuations of the second kind are cut to their own budgets
    # afterwards (the first b tokens of a longer sample are a sample of at most b tokens).
    forced, closed = [], []
    for gi, group in enumerate(first):
        for si, s in enumerate(group):
            if s.finish_reason == "length":
                forced.append((gi, si, forced_ids, think.answer_tokens))
            elif s.text.endswith(think.end) and max_tokens > len(s.token_ids):
                closed.append((gi, si, [], max_tokens - len(s.token_ids)))
    for k, jobs in enumerate((forced, closed)):
        if not jobs:
            continue
        conts = [[*prompts[gi], *first[gi][si].token_ids, *suffix] for gi, si, suffix, _ in jobs]
        budget = max(b for *_, b in jobs)
        second = engine.generate(conts, n=1, max_tokens=budget, seed=seed + 1 + k, **kw)
        for (gi, si, suffix, own), (c,) in zip(jobs, second):
            cont, reason = list(c.token_ids), c.finish_reason
            if len(cont) > own:
                cont, reason = cont[:own], "length"
            ids = [*first[gi][si].token_ids, *suffix, *cont]
            out[gi][si] = Response(
                tokenizer.decode(ids, skip_special_tokens=True),
                len(ids),
                reason,
                think_tokens=len(first[gi][si].token_ids),
                forced=bool(suffix),
            )
    return out
