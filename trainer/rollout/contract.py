"""The rollout engine contract: what every engine (``trainer.rollout.vllm_engine``, ``trainer.rollout.hf_engine``)
returns, the protocol it follows, and the checks of its inputs that all engines share.

An engine samples n responses per prompt with token ids, finish reasons and the sampling log-prob of each
generated token (:class:`Sample`), and takes new policy weights between steps, named as in the model
folder and checked against it (:class:`CheckpointLayout`). ``trainer.rollout.engines`` picks one by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..fsutil import UserError
from ..model_files.weights import check_safetensors_file, check_safetensors_folder


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (ended by itself) or "length" (cut by max_tokens: truncated)
    logprobs: list[float]  # log-prob of each generated token under the sampling distribution (after T, top-p)


Prompt = str | Sequence[int]
NamedTensors = Iterable[tuple[str, "torch.Tensor"]]  # noqa: F821 (torch is imported lazily)


@dataclass
class WeightSyncStats:
    tensors: int
    bytes: int
    seconds: float


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> list[list[Sample]]:
        """``n`` samples per prompt. ``stop`` strings end a sample (finish reason "stop") with the string
        included at the end of its text; its token ids run through the token that completed the string."""
        ...

    def update_weights(self, named_tensors: NamedTensors) -> WeightSyncStats: ...

    @property
    def can_sleep(self) -> bool:
        """Whether :meth:`sleep` frees the device's memory (else it and :meth:`wake_up` do nothing)."""
        ...

    def sleep(self) -> None:
        """Free the engine's device memory for the policy update: every tag of ``SLEEP_TAGS`` sleeps."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate ``tags`` (a subset of ``SLEEP_TAGS``; all when None)."""
        ...

    def close(self) -> None:
        """Release the engine (and any distributed state it set up); the engine is unusable afterwards."""
        ...


# What a sleeping engine has released: its weights (offloaded at sleep level 1, discarded at level 2)
# and its KV cache. vLLM's names, so that they pass to ``vllm.LLM.wake_up`` as they are.
SLEEP_TAGS = ("weights", "kv_cache")


def chat_prompts(model_dir: Path, questions: Sequence[str]) -> list[str]:
    """Each question as one user turn in the model's chat template, ready for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


def check_sampling(n: int, max_tokens: int, temperature: float, top_p: float) -> None:
    """The sampling arguments of ``generate``, checked the same way by every engine."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class CheckpointLayout:
    """Names and shapes of a model folder's tensors (read from the safetensors headers only),
    so that a weight update is checked before any tensor reaches the engine."""

    def __init__(self, model_dir: Path):
        # Safetensors only, each file whole (trainer.model_files.weights): the engines load nothing else.
        self.files = files = check_safetensors_folder(Path(model_dir))
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            header, _ = check_safetensors_file(f)
            for key, meta in header.items():
                if key != "__metadata__":
                    self.shapes[key] = tuple(meta["shape"])
        config = _read_config(model_dir)
        # Tied models store no lm_head, but vLLM keeps a separate head that must be loaded too.
        self.tied = bool(config.get("tie_word_embeddings", False))
        embed = "model.embed_tokens.weight"
        if self.tied and "lm_head.weight" not in self.shapes and embed in self.shapes:
            self.shapes["lm_head.weight"] = self.shapes[embed]

    def folder_tensors(self) -> Iterator[tuple[str, object]]:
        """The folder's own tensors, one at a time (vLLM's reload from disk would skip a tied head)."""
        from safetensors import safe_open

        for f in self.files:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.shapes:
            raise ValueError(f"update_weights: unknown tensor {name!r}: the model folder has no tensor of that name")
        if tuple(shape) != self.shapes[name]:
            raise ValueError(f"update_weights: tensor {name!r} has shape {tuple(shape)}, expected {self.shapes[name]}")

    def check_whole(self, named: NamedTensors | Mapping) -> NamedTensors:
        """A dict or list is checked entirely before anything is loaded, so a bad update is refused
        while the old weights are still whole; a lazy stream is returned as it is (checked as it flows)."""
        if isinstance(named, Mapping):
            named = list(named.items())
        if isinstance(named, Sequence):
            for name, tensor in named:
                self.check(name, tuple(tensor.shape))
        return named

    def with_tied_head(self, named: NamedTensors) -> Iterator[tuple[str, object]]:
        """The stream, plus ``lm_head.weight`` right after the embedding for tied models (unless
        the caller sent it), each checked against the folder's layout."""
        sent_head, embed = False, None
        for name, tensor in named:
            self.check(name, tuple(tensor.shape))
            sent_head |= name == "lm_head.weight"
            if name == "model.embed_tokens.weight":
                embed = tensor
            yield name, tensor
        if self.tied and not sent_head and embed is not None:
            yield "lm_head.weight", embed


def _read_config(model_dir: Path) -> dict:
    import json

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json: not a Hugging Face model folder")
    return json.loads(path.read_text())


def check_sleep_tags(tags: Sequence[str] | None) -> set[str]:
    """The tags ``wake_up`` was given, as a set (all of ``SLEEP_TAGS`` for None); unknown tags are an error."""
    if tags is None:
        return set(SLEEP_TAGS)
    if isinstance(tags, str) or not all(tag in SLEEP_TAGS for tag in tags):
        raise ValueError(f"wake_up tags must be a list of {SLEEP_TAGS} (or None for all), got {tags!r}")
    return set(tags)
