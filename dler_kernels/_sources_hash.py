"""The fingerprint of the extension's sources (``csrc/``), compiled into ``dler_kernels._C`` by
setup.py and compared by ``dler_kernels._ext`` in a source checkout, so that an extension built
from other sources is noticed. Standard library only: setup.py loads this file by path."""

import hashlib
from pathlib import Path

SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def sources_hash(csrc: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(csrc).rglob("*") if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
