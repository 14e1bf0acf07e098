"""The order prompts are trained in (:class:`PromptStream`): a per-epoch permutation handed out ``k`` at
a time, deterministic, and resumable from a checkpoint exactly where it stopped."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Mapping, Sequence

from ..fsutil import UserError
from .examples import Example
from .stable_random import randint

# 64 bits of the hash: enough to tell data sets apart, short enough to read in a message.
_FINGERPRINT_HEX_DIGITS = 16


def fingerprint(examples: Sequence[Example]) -> str:
    """A short hash of the examples' content and order.

    A saved cursor means "position p of the permutation of this list", so it is only valid for the same
    examples in the same order; ids alone are not enough (toy-arith of another seed has the same ids).
    """
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.id, example.question, example.answer, example.source]).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:_FINGERPRINT_HEX_DIGITS]


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Fisher-Yates from ``random.Random(f"{seed}:{epoch}")`` using only ``random()``.

    A string seed is hashed with SHA-512 (independent of PYTHONHASHSEED), and ``random()`` is the
    sequence Python keeps stable across versions, so a checkpoint resumes the same order after an upgrade.
    Each epoch's order depends on (seed, epoch) alone: computing epoch 7 needs no epochs 0-6.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = randint(rng, 0, i)
        order[i], order[j] = order[j], order[i]
    return order


_STATE_VERSION = 1


class PromptStream:
    """Examples in a fresh permutation each epoch, handed out ``k`` at a time, with a resumable cursor.

    The dynamic sampler keeps asking for more prompts until its batch is full, so requests cross epoch
    boundaries; ``take`` does that seamlessly (the tail of one epoch, then the head of the next). Every
    example appears exactly once per epoch. The cursor (``epoch``, ``position`` within it) plus the seed is
    the whole state: :meth:`state_dict` saves it as plain JSON-able data and :meth:`load_state_dict` on a
    stream over the same examples continues exactly where the original would have.
    """

    def __init__(self, examples: Sequence[Example], *, seed: int, shuffle: bool = True) -> None:
        if len(examples) == 0:
            raise ValueError("PromptStream needs at least one example")
        self._examples = list(examples)
        self._seed = int(seed)
        self._shuffle = bool(shuffle)
        self._epoch = 0
        self._position = 0
        self._fingerprint = fingerprint(self._examples)
        self._order_cache: tuple[int, list[int]] | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next example comes from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many examples of the current epoch have been handed out (0 <= position < len(examples))."""
        return self._position

    @property
    def num_examples(self) -> int:
        return len(self._examples)

    def _order(self, epoch: int) -> list[int]:
        if not self._shuffle:
            return list(range(len(self._examples)))
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, _permutation(len(self._examples), self._seed, epoch))
        return self._order_cache[1]

    def take(self, k: int) -> list[Example]:
        """The next ``k`` examples, continuing into the next epoch(s) as needed."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"take(k) needs an integer k >= 0, got {k!r}")
        out: list[Example] = []
        n = len(self._examples)
        while len(out) < k:
            order = self._order(self._epoch)
            stop = min(n, self._position + k - len(out))
            out.extend(self._examples[i] for i in order[self._position : stop])
            self._position = stop
            if self._position == n:
                self._epoch, self._position = self._epoch + 1, 0
        return out

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        return self.take(1)[0]

    def state_dict(self) -> dict:
        """The cursor as plain JSON-serialisable data, for checkpoints."""
        return {
            "version": _STATE_VERSION,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "epoch": self._epoch,
            "position": self._position,
            "num_examples": len(self._examples),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict`; the saved seed and shuffle flag replace this stream's own.

        They replace them because a resumed run must continue the order it was following, whatever the
        constructor was given. A state from another data set (other size or content) is refused.
        """
        expected = {"version": int, "seed": int, "shuffle": bool, "epoch": int, "position": int, "num_examples": int}
        for key, kind in {**expected, "fingerprint": str}.items():
            value = state.get(key) if isinstance(state, Mapping) else None
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UserError(
                    f"the data cursor in the checkpoint is damaged: {key!r} is missing or not a {kind.__name__}"
                )
        if state["version"] != _STATE_VERSION:
            raise UserError(f"the data cursor has format version {state['version']}; this dler reads {_STATE_VERSION}")
        if state["num_examples"] != len(self._examples) or state["fingerprint"] != self._fingerprint:
            raise UserError(
                f"the data cursor was saved for another data set ({state['num_examples']} examples, "
                f"fingerprint {state['fingerprint']}); this one has {len(self._examples)} examples, "
                f"fingerprint {self._fingerprint}: resume with the same data, filters and limit"
            )
        if state["epoch"] < 0 or not 0 <= state["position"] < len(self._examples):
            raise UserError(f"the data cursor is damaged: epoch {state['epoch']}, position {state['position']}")
        self._seed, self._shuffle = state["seed"], state["shuffle"]
        self._epoch, self._position = state["epoch"], state["position"]
        self._order_cache = None
