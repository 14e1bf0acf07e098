"""Writing dler's outputs safely: the one place that decides whether a command may write its output
folder, and files and directories that appear whole or not at all. Also home of :class:`UserError`, the
error type of everything the user can fix (its translation of storage failures is
:mod:`trainer.storage_errors`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO


class UserError(Exception):
    """A problem the user can fix (bad path, missing package, bad config).

    The CLI prints it as one line and exits with code 2; it never carries a traceback.
    """


# Written last into a finished directory: its presence means the directory is complete.
COMPLETE_MARKER = ".dler-complete"
# Written first into an output folder a dler command creates; it holds the command's name. A non-empty
# folder without it belongs to the user, and no command writes into it unless told to replace it.
OWNER_MARKER = ".dler-run"


# Inside a folder a dler command is writing: the kernel lock on it is that command's claim (FolderLock).
LOCK_FILE = ".dler-lock"
# Errors of a file system that has no locks at all (some network and FUSE mounts), as opposed to a held lock.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def owner(path: Path) -> str | None:
    """The dler command that created folder ``path`` (its marker), or None."""
    try:
        return (Path(path) / OWNER_MARKER).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def mark_owner(path: Path, command: str) -> None:
    """Claim folder ``path`` for ``command``: later runs may then treat it as theirs."""
    (Path(path) / OWNER_MARKER).write_text(command + "\n", encoding="utf-8")


def _try_flock(fd: int) -> bool | None:
    """An exclusive flock on ``fd`` without waiting: True (taken), False (another process holds it), None (the file
    system has no locks)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in _NO_LOCKS:
            return None
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "its pid not written yet"


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)


class FolderLock:
    """The claim of one process on a folder it writes: an exclusive ``fcntl.flock`` on ``LOCK_FILE`` inside it,
    whose text names the holder (its pid and host). The kernel drops the lock when the holder's process ends,
    however it ends (kill -9 included), so a lock is never stale; the file stays behind and means nothing
    without the lock. ``command`` is the dler command that takes it and ``name`` what the user calls the folder
    (``--out``, ``run.out``), for the refusal of a second one."""

    def __init__(self, folder: Path, command: str, name: str = "--out"):
        self.folder, self.command, self.name = Path(folder), command, name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock (the folder must exist). Raises a one-line UserError naming the holder when another
        process has it; returns False, holding nothing, on a file system without locks."""
        path = self.folder / LOCK_FILE
        while self._fd is None:
            # O_CLOEXEC: the processes this one starts (eval workers, engines) must not carry the claim on.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                locked = _try_flock(fd)
            except OSError:
                os.close(fd)
                raise
            if locked is None:  # a file system without locks
                os.close(fd)
                return False
            if not locked:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(
                    f"{self.name} {self.folder} is in use by another `dler {self.command}` ({holder}): wait for it to "
                    f"end or stop it, or choose another {self.name}"
                )
            try:
                # The file this lock is on must still be the one at the path (not one a release just removed).
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            _write_holder(fd)
            self._fd = fd
        return True

    def release(self) -> None:
        """Give the lock back (a no-op when it is not held)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def exclusive_lock(
    path: Path, *, timeout_s: float, what: str, say: Callable[[str], None] | None = None, poll_s: float = 0.5
) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on the file ``path`` while the block runs, waiting for another process
    that holds it for up to ``timeout_s`` seconds (then a UserError naming the holder). The kernel drops a lock
    when its process ends, however it ends, so only a live holder is waited for. ``what``: what the lock guards,
    for the messages; ``say`` is told once that this process waits, and for whom. On a file system without locks
    the block runs unlocked. The file stays behind, unlinked never (a removal would race a waiter's open)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline, told = time.monotonic() + timeout_s, False
        while (locked := _try_flock(fd)) is False:
            holder = _holder(fd)
            if time.monotonic() > deadline:
                raise UserError(
                    f"{what}: another process ({holder}) still holds {path} after {timeout_s:.0f} s; wait for it "
                    "to end or stop it"
                )
            if not told and say is not None:
                say(f"{what}: another process ({holder}) is on it; waiting for it (up to {timeout_s:.0f} s)")
                told = True
            time.sleep(poll_s)
        if locked:
            _write_holder(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ------------------------------------------------------------------------------------ output folders


def _dangerous(out: Path) -> str | None:
    """Why replacing ``out`` would destroy far more than an output (None when it would not)."""
    resolved = out.resolve()
    if resolved == Path(resolved.anchor):
        return "the root of the file system"
    if resolved == Path.home().resolve():
        return "your home folder"
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "the current folder or one above it"
    return None


def check_output(
    out: Path,
    command: str | None,
    *,
    overwrite: bool = False,
    flag: str | None = "--overwrite",
    name: str = "--out",
    inputs: Iterable[tuple[str, Path]] = (),
    kind: str = "dir",
    ours_ok: bool = False,
) -> str:
    """Whether ``command`` may write ``out``: the one rule every dler command follows, checked before any
    work and before anything is written anywhere.

    Returns ``"new"`` (missing, or an empty folder), ``"ours"`` (a folder this command created, its
    ``OWNER_MARKER`` says so, and the caller asked with ``ours_ok`` to decide itself what to do with it) or
    ``"replace"`` (``overwrite`` was given: the caller replaces it whole). Raises a one-line UserError for
    anything else: a non-empty folder the command did not make (the user's), a file where a folder goes
    (``kind="dir"``) or the reverse, an output that is, holds or lies inside one of the ``inputs``
    (``(label, path)``; replacing it would destroy an input), and a replacement of the file-system root,
    the home folder or the current folder. ``flag`` is the option that allows a replacement (None: the
    command has none), ``name`` what the user calls the output (``--out``, ``run.out``).
    """
    out = Path(out).expanduser().absolute()
    elsewhere = f"choose another {name}"
    for label, path in inputs:
        inp, target = Path(path).expanduser().resolve(), out.resolve()
        if target == inp:
            relation = "is"
        elif inp in target.parents and kind == "dir":  # a new file inside an input folder destroys nothing
            relation = "lies inside"
        elif target in inp.parents:
            relation = "holds"
        else:
            continue
        raise UserError(f"{name} {out} {relation} the {label} {path}: writing it would destroy an input; {elsewhere}")
    replace_hint = f"pass {flag} to replace it, or {elsewhere}" if flag else f"{elsewhere} (a new or empty folder)"
    if kind == "file":
        if out.is_dir():
            raise UserError(f"{name} {out} is a folder; {name} names the file to write: {elsewhere}")
        if out.exists() or out.is_symlink():
            if overwrite:
                return "replace"
            raise UserError(f"{out} exists; {replace_hint}")
        return "new"
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; {elsewhere}")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    made_by = owner(out)
    if command is not None and made_by == command and ours_ok:
        return "ours"
    if overwrite:
        danger = _dangerous(out)
        if danger:
            raise UserError(f"refusing to replace {out}: it is {danger}; {elsewhere}")
        return "replace"
    if command is not None and made_by == command:
        raise UserError(f"{out} holds the output of an earlier `dler {command}`; {replace_hint}")
    if command is not None:
        raise UserError(
            f"{out} is not empty and was not made by `dler {command}`: nothing in it is touched; {replace_hint}"
        )
    raise UserError(f"output directory {out} is not empty; {replace_hint}")


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


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure written as a PNG that appears at ``path`` whole or not at all (a temporary sibling,
    then ``os.replace``), so a plot redrawn while someone opens it is never half written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")  # savefig takes the format from the suffix
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed save leaves neither a half PNG nor a stray temporary
        raise


@contextlib.contextmanager
def atomic_directory(
    out: Path,
    overwrite: bool = False,
    flag: str = "--force",
    *,
    command: str | None = None,
    inputs: Iterable[tuple[str, Path]] = (),
) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; rename it to ``out`` only on success.

    On any exception the temporary directory is removed, so a failed or killed
    write never leaves a half-written ``out`` behind (a kill leaves only a hidden
    ``.out.tmp-*`` sibling, which the next call ignores). ``flag`` is the option named in the refusal
    to replace a non-empty ``out``. ``command``: the dler command writing it; the folder is marked as
    its own (:data:`OWNER_MARKER`) and checked with :func:`check_output`.
    """
    out = Path(out).expanduser().absolute()
    check_output(out, command, overwrite=overwrite, flag=flag, inputs=inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror or e}") from None
    try:
        if command is not None:
            mark_owner(tmp, command)
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
