"""Hugging Face model folders: where the ones the project writes itself are cached (:func:`cache_dir`), the
safetensors file of a model's weights (:func:`save_state_dict`), and the tokenizer every reader of a folder
needs, checked before any work (:func:`check_tokenizer`) and loaded with a one-line error
(:func:`load_tokenizer`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..fsutil import UserError

CACHE_ENV = "DLER_CACHE"
DEFAULT_CACHE = "~/.cache/dler"
# The vocabulary files transformers builds a tokenizer from (fast, SentencePiece, BPE, WordPiece); *.tiktoken too.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_TOKENIZER_HINT = (
    "copy the tokenizer of the model it was made from into it: "
    "AutoTokenizer.from_pretrained(SOURCE).save_pretrained(FOLDER)"
)


def cache_dir() -> Path:
    """Where prepared models are cached: ``$DLER_CACHE``, default ``~/.cache/dler``."""
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)).expanduser()


def save_state_dict(model, folder: Path, dtype) -> None:
    """safetensors of the model in ``dtype``. Tied output heads are stored once (as the embedding):
    safetensors refuses shared storage, and transformers and vLLM re-tie on load."""
    from safetensors.torch import save_file

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        state[name] = tensor.detach().to(dtype).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def check_tokenizer(folder: Path) -> None:
    """Refuse, with one line naming the folder, a model folder with no tokenizer vocabulary file (a folder of
    weights and config only): checked before any work, where a reader would otherwise fail minutes later."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")):
        return
    raise UserError(f"model folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {_TOKENIZER_HINT}")


def load_tokenizer(folder: Path, **kwargs):
    """The folder's tokenizer (``AutoTokenizer``); a folder without one, or one transformers cannot build, is a
    one-line UserError rather than transformers' traceback."""
    from transformers import AutoTokenizer

    check_tokenizer(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # a damaged or foreign file fails in many ways: each is the folder's problem
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot load the tokenizer of model folder {folder} ({type(e).__name__}: {reason}); {_TOKENIZER_HINT}"
        ) from None
