"""One run per run folder: the lock a `dler train` (fresh or resumed) holds on its run.out for the whole run,
taken by another process and by the kernel given back when that process is killed."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer import cli
from trainer.checkpoint.run_folder import RunFolder
from trainer.fsutil import LOCK_FILE, FolderLock, UserError

REPO = Path(__file__).parents[3]
# A second process that claims run.out the way `dler train` does, says so, and then holds it until killed.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from trainer.checkpoint.run_folder import RunFolder

    RunFolder(Path(sys.argv[1]), print).claim(resume=False)
    print("claimed", flush=True)
    time.sleep(600)
    """
)


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if line.strip() != "claimed":
        proc.kill()
        pytest.fail(f"the holder did not claim {out}: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


def test_a_second_claim_names_the_holders_pid_and_a_killed_holder_frees_the_folder(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        in_use = rf"run.out {out} is in use by another `dler train` \(pid {holder.pid} "
        for resume in (False, True):
            with pytest.raises(UserError, match=in_use):
                RunFolder(out, print).claim(resume)
        assert sorted(p.name for p in out.iterdir()) == sorted([".dler-run", LOCK_FILE]), "the refusal wrote nothing"
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up of its own: the kernel drops the lock
        holder.wait()
    said = []
    folder = RunFolder(out, said.append)
    assert folder.claim(resume=False) is True  # the killed start's folder (no checkpoint) is taken over
    assert said == [f"{out} holds a run that stopped before its first checkpoint: starting it over"]
    assert (out / LOCK_FILE).read_text() == f"pid {os.getpid()} on host {os.uname().nodename}\n"
    with pytest.raises(UserError, match=rf"pid {os.getpid()} "):
        RunFolder(out, print).claim(resume=True)  # one claim per run, within one process too
    folder.unlock()
    RunFolder(out, print).claim(resume=True)  # let go at the end of the run: the next one gets it


def test_a_start_that_fails_gives_back_its_folder_and_its_lock(tmp_path):
    out = tmp_path / "run"
    folder = RunFolder(out, print)
    folder.claim(resume=False)
    folder.release(resume=False)
    assert not out.exists()
    lock = FolderLock(tmp_path, "train")
    assert lock.acquire() and lock.held
    lock.release()
    assert not lock.held


def test_dler_train_on_a_run_folder_in_use_is_one_line_naming_the_pid_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        rc = cli.main(["train", "--no-progress", f"run.out={out}", f"model.path={tmp_path / 'no-model'}"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"dler train: error: run.out {out} is in use") and f"pid {holder.pid}" in line
