"""Errors meant for the user, and directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


class UserError(Exception):
    """A problem the user can fix (bad path, missing package, bad config).

    The CLI prints it as one line and exits with code 2; it never carries a traceback.
    """


# Written last into a finished directory: its presence means the directory is complete.
COMPLETE_MARKER = ".dler-complete"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[str]]:
    """A text file to write that appears at ``path`` whole or not at all: a temporary sibling, flushed and
    fsynced, then ``os.replace``d over ``path``; on any exception the sibling is removed and ``path`` is left
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(), not mkstemp: the file gets the usual permissions (umask) rather than mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_dir(out: Path, overwrite: bool = False, flag: str = "--force") -> None:
    """Refuse an output path that is a file, or a non-empty directory unless ``overwrite``: called before
    long work as well as by :func:`atomic_directory`, so a refusal costs nothing."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} is not empty; pass {flag} to replace it")


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool = False, flag: str = "--force") -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; rename it to ``out`` only on success.

    On any exception the temporary directory is removed, so a failed or killed
    write never leaves a half-written ``out`` behind (a kill leaves only a hidden
    ``.out.tmp-*`` sibling, which the next call ignores). ``flag`` is the option named in the refusal
    to replace a non-empty ``out``.
    """
    out = Path(out).expanduser().absolute()
    check_output_dir(out, overwrite, flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror or e}") from None
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text("")
        if out.exists():
            # Replace: move the old one aside first so that `out` is never missing a file mid-way.
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
