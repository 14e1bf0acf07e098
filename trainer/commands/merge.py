"""``dler merge``: magnitude-selective weight merging (DLER paper, section 4.6).

    delta = theta_tuned - theta_base;  keep the top k of |delta| (per tensor, or over the whole model),
    zero the rest;  theta = theta_base + s * kept_delta                       (paper: k = 25%, s = 0.7)

"Top k" means: with m = round(k * n) of n entries, every entry whose |delta| is at least the m-th largest
|delta| is kept (ties at the threshold are all kept, so the choice does not depend on element order);
k = 0 keeps nothing (the base model), k = 1 keeps everything (with s = 1, the tuned model, bit for bit: a kept
entry at s = 1 is the tuned weight itself rather than base + delta recomputed).
Magnitudes are ranked in float32.

Memory stays bounded by a few copies of the largest tensor, whatever the model's size: tensors are read one at
a time from the safetensors files of both folders (sharded or not), and written straight into output files
whose headers are laid out before the first tensor is computed, so no output shard is ever held whole. The
global threshold is found exactly in two streaming passes of a radix selection over the float32 bit patterns
of |delta| (non-negative floats order like their bits): a histogram of the top 16 bits finds the bin that holds
the m-th largest value, a histogram of the low 16 bits inside that bin finds the value.

The output mirrors the tuned folder: the same files with the same tensors in the same dtypes, its
``model.safetensors.index.json``, config, tokenizer and every other file, plus ``dler_merge.json`` recording
the settings and what was kept. It is written atomically.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..fsutil import UserError, atomic_directory, check_output
from ..model_files.tensor_files import ShardWriter, TensorInfo, TensorReader, list_tensors
from ..model_files.weights import PICKLE_SUFFIXES, read_header
from .merge_selection import global_threshold, keep_count, magnitudes, tensor_threshold

SCOPES = ("tensor", "global")
REPORT = "dler_merge.json"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _check_pair(base_dir: Path, tuned_dir: Path) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    for label, folder in (("--base", base_dir), ("--tuned", tuned_dir)):
        if not folder.is_dir():
            raise UserError(f"{label} model folder {folder} not found")
        if not (folder / "config.json").is_file():
            raise UserError(f"{label} {folder} has no config.json: not a Hugging Face model folder")
    base_cfg = json.loads((base_dir / "config.json").read_text())
    tuned_cfg = json.loads((tuned_dir / "config.json").read_text())
    for key in ("architectures", "model_type"):
        if base_cfg.get(key) != tuned_cfg.get(key):
            raise UserError(
                f"the models differ in {key}: base {base_cfg.get(key)!r}, tuned {tuned_cfg.get(key)!r}; "
                "a merge needs the same architecture"
            )
    base, tuned = list_tensors(base_dir), list_tensors(tuned_dir)
    only_base, only_tuned = sorted(set(base) - set(tuned)), sorted(set(tuned) - set(base))
    if only_base or only_tuned:
        parts = [f"only in base: {', '.join(only_base[:3])}" * bool(only_base)]
        parts += [f"only in tuned: {', '.join(only_tuned[:3])}" * bool(only_tuned)]
        raise UserError(f"the models hold different tensors ({'; '.join(p for p in parts if p)})")
    for name in tuned:
        if base[name].shape != tuned[name].shape:
            raise UserError(
                f"tensor {name!r} has shape {list(base[name].shape)} in base and {list(tuned[name].shape)} in tuned"
            )
        if (base[name].dtype in _FLOAT_DTYPES) != (tuned[name].dtype in _FLOAT_DTYPES):
            raise UserError(f"tensor {name!r} is {base[name].dtype} in base and {tuned[name].dtype} in tuned")
    return base, tuned


def merge_models(
    base_dir: Path,
    tuned_dir: Path,
    out: Path,
    *,
    top_k: float = 0.25,
    scale: float = 0.7,
    scope: str = "tensor",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``theta_base + scale * top_k(theta_tuned - theta_base)`` into ``out``; return the report."""
    import torch

    from ..progress import progress as progress_bar

    if not 0 <= top_k <= 1:
        raise UserError(f"--top-k must be a fraction in [0, 1] (0.25 keeps 25%), got {top_k}")
    if not math.isfinite(scale):
        raise UserError(f"--scale must be a finite number, got {scale}")
    if scope not in SCOPES:
        raise UserError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    base_dir, tuned_dir, out = (Path(p).expanduser() for p in (base_dir, tuned_dir, out))
    # The output may never be, hold or sit inside an input: replacing it would destroy the models read.
    inputs = (("--base", base_dir), ("--tuned", tuned_dir))
    check_output(out, "merge", overwrite=overwrite, inputs=inputs)
    base_info, tuned_info = _check_pair(base_dir, tuned_dir)
    floats = [n for n in tuned_info if tuned_info[n].dtype in _FLOAT_DTYPES]
    base_reader, tuned_reader = TensorReader(base_info), TensorReader(tuned_info)

    def pairs(label):
        for name in progress_bar(floats, desc=f"merge: {label}", unit="tensor", enabled=progress, leave=False):
            base, tuned = base_reader.get(name), tuned_reader.get(name)
            _check_finite(name, base, tuned)
            yield base, tuned

    total = sum(math.prod(tuned_info[n].shape) for n in floats)
    threshold = global_threshold(pairs, keep_count(top_k, total), total) if scope == "global" else None
    per_tensor, kept_total = {}, 0
    with atomic_directory(out, overwrite=overwrite, flag="--overwrite", command="merge", inputs=inputs) as tmp:
        for f in sorted(tuned_dir.iterdir()):
            # Not the tuned folder's weights (the merge writes its own), nor pickles of them beside the safetensors.
            if f.suffix == ".safetensors" or f.name.endswith(PICKLE_SUFFIXES) or f.name.startswith("."):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        by_file: dict[Path, list[TensorInfo]] = {}
        for info in tuned_info.values():
            by_file.setdefault(info.file, []).append(info)
        bar = progress_bar(total=len(tuned_info), desc="merge: write", unit="tensor", enabled=progress, leave=False)
        for file, infos in sorted(by_file.items()):
            infos.sort(key=lambda i: i.offset)
            header, _ = read_header(file)
            writer = ShardWriter(
                tmp / file.name, [(i.name, i.dtype, i.shape) for i in infos], header.get("__metadata__")
            )
            try:
                for info in infos:
                    tuned = tuned_reader.get(info.name)
                    if info.dtype not in _FLOAT_DTYPES:
                        writer.write(info.name, tuned)  # integer buffers are not weights: the tuned model's
                    else:
                        base = base_reader.get(info.name)
                        _check_finite(info.name, base, tuned)
                        delta, magnitude = magnitudes(base, tuned)
                        if scope == "tensor":
                            limit = tensor_threshold(magnitude, keep_count(top_k, magnitude.numel()))
                        else:
                            limit = threshold
                        keep = magnitude >= limit
                        if scale == 1.0:
                            # base + 1 * delta is the tuned weight itself; computing it would round wherever
                            # delta is inexact in the compute dtype (weights whose exponents differ widely).
                            merged = torch.where(keep, tuned, base.to(tuned.dtype))
                        else:
                            merged = base.to(delta.dtype) + scale * torch.where(keep, delta, torch.zeros_like(delta))
                        writer.write(info.name, merged.to(tuned.dtype))
                        kept = int(keep.sum())
                        kept_total += kept
                        per_tensor[info.name] = {"kept": kept, "of": magnitude.numel(), "threshold": _finite(limit)}
                    bar.update()
            except BaseException:
                writer.file.close()  # the error that stopped the write is the one to report
                raise
            writer.close()
        bar.close()
        report = {
            "base": str(base_dir.absolute()),
            "tuned": str(tuned_dir.absolute()),
            "top_k": top_k,
            "scale": scale,
            "scope": scope,
            "global_threshold": _finite(threshold),
            "kept": kept_total,
            "of": total,
            "kept_fraction": kept_total / total if total else 0.0,
            "tensors": per_tensor,
        }
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: the threshold of "keep nothing" is written as null."""
    return value if value is not None and math.isfinite(value) else None


def _check_finite(name: str, base, tuned) -> None:
    import torch

    for label, t in (("base", base), ("tuned", tuned)):
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"tensor {name!r} of the {label} model holds NaN or inf values; refusing to merge it")
