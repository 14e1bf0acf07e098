"""Model folders hold their weights as safetensors, and a folder is checked before any weight is read.

One rule for every reader of a model folder (the policy, both rollout engines, ``dler eval``, ``dler merge``,
``dler drqa-data``): the weights are ``*.safetensors`` files. Pickled weights (``pytorch_model.bin``, ``*.pt``)
are refused before anything is read: unpickling is a parser of code-bearing files (``torch.load``'s
``weights_only=True`` narrows what it runs, and has had bypasses), the engines and this trainer's own
checkpoints use safetensors anyway, and converting a folder is one call (:data:`CONVERT_HINT`). A folder
holding both formats is read through its safetensors; its pickles are never opened.

:func:`check_safetensors_folder` also reads each safetensors header (its first bytes) and compares the data
it declares with the file's size, so a truncated or damaged copy is reported by name at once, rather than
as a ``SafetensorError`` traceback out of transformers or vLLM after minutes of other work.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..fsutil import UserError

__all__ = [
    "CONVERT_HINT",
    "PICKLE_SUFFIXES",
    "SAFETENSORS_INDEX",
    "check_safetensors_file",
    "check_safetensors_folder",
    "read_header",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Weight files written with torch.save (pickles), and the index of pickled shards.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".bin.index.json")
HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header
CONVERT_HINT = (
    "convert it once with transformers: AutoModelForCausalLM.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER, "
    "safe_serialization=True), and AutoTokenizer.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER)"
)
_RECOPY = "copy or download the model folder again"


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data section starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (size,) = struct.unpack("<Q", raw)
            if size > HEADER_LIMIT:
                raise ValueError(f"header of {size} bytes")
            text = f.read(size)
            if len(text) != size:
                raise ValueError(f"the file ends inside its {size}-byte header")
            header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is not a readable safetensors file ({e}); {_RECOPY}") from None
    return header, 8 + size


def check_safetensors_file(path: Path) -> tuple[dict, int]:
    """The header of ``path`` and where its data section starts (as :func:`read_header`), after checking
    that the file holds all the tensor data the header declares (a truncated copy does not). Reads only
    the header."""
    path = Path(path)
    header, start = read_header(path)
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        meta = meta if isinstance(meta, dict) else {}
        offsets, shape = meta.get("data_offsets"), meta.get("shape")
        if not (
            isinstance(meta.get("dtype"), str)
            and isinstance(shape, list)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(v, int) for v in [*offsets, *shape])
        ):
            raise UserError(
                f"{path} is not a readable safetensors file (tensor {name!r} lacks a dtype, shape or data offsets); "
                f"{_RECOPY}"
            )
        end = max(end, offsets[1])
    size = path.stat().st_size
    if start + end > size:
        raise UserError(f"{path} is truncated: its header declares {start + end} bytes, the file has {size}; {_RECOPY}")
    return header, start


def check_safetensors_folder(folder: Path, *, index: bool = True) -> list[Path]:
    """The ``*.safetensors`` files of a model folder, each checked (:func:`check_safetensors_file`), and (with
    ``index``) the shards its ``model.safetensors.index.json`` names present, as transformers and vLLM load
    through it; a reader of the files themselves passes False. Refuses, with one line naming the folder, a
    folder whose weights are only pickles (saying how to convert them) or that has no weights. The caller
    checks that the folder has its config.json (with its own message, naming its own option)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} not found")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
            raise UserError(
                f"model folder {folder} holds only pickled weights ({shown}); dler reads safetensors only "
                f"(loading a pickle can run code from the file): {CONVERT_HINT}"
            )
        raise UserError(
            f"model folder {folder} has no weights (no *.safetensors files); point it at a complete Hugging Face "
            "folder with safetensors weights"
        )
    index_file = folder / SAFETENSORS_INDEX
    if index and index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index_file} is not a readable index of safetensors shards; {_RECOPY}") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{index_file} names {missing[0]}, which is missing from {folder}; {_RECOPY}")
    for f in files:
        check_safetensors_file(f)
    return files
