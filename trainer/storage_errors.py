"""The one translation of a file-system or storage failure (read-only, disk full, no permission, a truncated
or corrupt file) into a one-line :class:`~trainer.fsutil.UserError` naming the path and what to do."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from .fsutil import UserError

# What to do about each kind of failure, by errno.
_ADVICE = {
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk, then run it again",
    errno.EDQUOT: "the disk quota is used up: free some space or choose a folder on another disk, then run it again",
    errno.EACCES: "permission denied: choose a folder you may write, or change its permissions",
    errno.EPERM: "operation not permitted: choose a folder you may write, or change its permissions",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder where a file was expected: check the path",
    errno.EIO: "the disk or network file system reported an I/O error: check it, then run it again",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter path",
}
_OS_ERROR_CODE = re.compile(r"os error (\d+)")


def storage_error(e: BaseException, doing: str = "", path: Path | str | None = None) -> UserError | None:
    """The one translation of a file-system or storage failure into a one-line UserError naming the path
    and what to do; None when ``e`` is not one (a bug, which keeps its traceback).

    Understands OSError (read-only, disk full, permission, ...), safetensors' errors (they carry the OS
    error code in their text) and torch's zip writer and reader (``inline_container.cc``: a failed write,
    usually a full disk, or a truncated or corrupt file). ``doing`` says what failed ("cannot write
    checkpoint X"), ``path`` the file when the error does not name one.
    """
    if isinstance(e, UserError):
        return e
    code: int | None = None
    if isinstance(e, OSError):
        code = e.errno
        where = e.filename if e.filename is not None else path
        reason = e.strerror or str(e)
    elif type(e).__name__ == "SafetensorError" or "inline_container" in str(e) or "PytorchStream" in str(e):
        text = str(e)
        match = _OS_ERROR_CODE.search(text)
        code = int(match.group(1)) if match else None
        where = path
        if code is None and ("Reader" in text or "deserializ" in text.lower()):
            reason = "the file is truncated or corrupt"
        elif code is None:
            reason = "the write failed"
            if where is not None and _nearly_full(Path(where)):
                code = errno.ENOSPC
        else:
            reason = os.strerror(code)
    else:
        return None
    advice = _ADVICE.get(code) if code is not None else None
    if advice is None and reason == "the write failed":
        advice = "the disk may be full or failing: check the free space (df), then run it again"
    if doing:
        head = f"{doing} ({where})" if where is not None and str(where) not in doing else doing
    else:
        head = str(where) if where is not None else "a file operation failed"
    return UserError(f"{head}: {reason}" + (f"; {advice}" if advice else ""))


_NEARLY_FULL_BYTES = 1 << 20  # under 1 MiB free counts as a full disk when a failed write is explained


def _nearly_full(path: Path) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has under 1 MiB free."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free < _NEARLY_FULL_BYTES
            except OSError:
                return False
    return False
