"""Nothing a user owns is ever lost, and every failure is one clear line (issue 23).

Each test drives the ``dler`` command in-process (``trainer.cli.main``) the way a careful adversarial user
did: folders holding their own files, an output that is an input, damaged checkpoints, a run folder left by
a failed start, a read-only or full file system (real tmpfs mounts where this runs as root), a torn metrics
file, a stop request during the last step, a learning rate that blows the policy up. Each asserts the exit
code, one line on stderr naming the path, and that every file the user had is byte-identical afterwards.
"""

import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from trainer import cli
from trainer.run.heldout import HeldOutEval
from trainer.train import Trainer


def _overrides(model: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """A run of the demo model that takes a second or two per step (as tests/e2e/test_train.py's)."""
    return [
        f"model.path={model}",
        f"run.out={out}",
        f"run.steps={steps}",
        "run.save_every=1",
        "run.keep_checkpoints=3",
        "rollout.engine=hf",
        "rollout.dtype=float32",
        "rollout.sampling.prompts_per_step=2",
        "rollout.sampling.samples_per_prompt=4",
        "rollout.sampling.dynamic_sampling=false",
        "rollout.sampling.max_tokens=32",
        "reward.penalty.name=kimi",
        "reward.penalty.length_budget=32",
        "algorithm.mini_batch_prompts=1",
        "optim.lr=1e-2",
        "eval.limit=2",
        "eval.samples_per_prompt=1",
        "eval.max_tokens=32",
        *extra,
    ]


def _train(*args: str) -> int:
    return cli.main(["train", "--no-progress", *args])


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative paths), to prove nothing was touched."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _error_line(err: str, command: str = "train") -> str:
    """The one error line of a failed command; no traceback around it."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"dler {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    assert err.rstrip().splitlines()[-1] == lines[0], "the error is the last thing said"
    return lines[0]


def _user_files(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("mine: true\n")
    (folder / "summary.json").write_text('{"mine": 1}\n')
    return _digests(folder)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *, read_only: bool = False, files: dict[str, str] | None = None):
    """A real tmpfs of ``size`` at ``path`` holding ``files`` (then remounted read-only if asked)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        for name, text in (files or {}).items():
            (path / name).write_text(text)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def finished_run(demo_model, tmp_path_factory) -> Path:
    """Two steps with a checkpoint after each (step-00000001, step-00000002); copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _train(*_overrides(demo_model, out, 2)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- 1. folders of the user's


def test_train_refuses_a_folder_of_the_users_own_files_and_leaves_them_byte_identical(demo_model, tmp_path, capsys):
    folder = tmp_path / "d"
    before = _user_files(folder)
    rc = _train(*_overrides(demo_model, folder, 1))
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and str(folder) in line and "run.out" in line
    assert _digests(folder) == before and sorted(p.name for p in folder.iterdir()) == ["config.yaml", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"], "nothing is written next to it either"


def test_a_start_that_fails_before_writing_anything_leaves_no_run_folder_behind(tmp_path, capsys):
    # run.out is claimed before the model loads (so that a read-only one fails at once); a bad model path
    # found after the claim gives the folder back.
    out = tmp_path / "run"
    rc = _train(f"model.path={tmp_path / 'no-such-model'}", f"run.out={out}", "rollout.engine=hf")
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and "no-such-model" in line
    assert list(tmp_path.iterdir()) == []


def test_an_oversized_data_row_is_one_line_naming_its_file_and_line_and_nothing_is_written(
    demo_model, tmp_path, capsys
):
    """A 16 MiB question among normal rows: with data.on_bad_row=error the run stops at the data check, before
    the model loads, naming the file and line (it is never tokenised whole: tests/trainer/data/test_data.py measures the
    memory); the data file is untouched and no run folder is left."""
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    rows = [{"question": f"{i} + {i} = ?", "answer": str(2 * i)} for i in range(20)]
    rows.insert(7, {"question": "1 + " * (4 << 20) + "1 = ?", "answer": "x"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _digests(data.parent)
    out = tmp_path / "run"
    rc = _train(*_overrides(demo_model, out, 1, f"data.train={data}", "data.on_bad_row=error"))
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and f"{data}:8" in line, line
    assert _digests(data.parent) == before and not out.exists()


@pytest.mark.parametrize("command", ["eval", "merge", "drqa-data", "prepare-model", "study"])
def test_every_other_command_refuses_a_folder_of_the_users_own_files(command, tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "d"
    before = _user_files(folder)
    model = str(tiny_llama_dir)
    args = {
        "eval": ["eval", "--model", model, "--data", "builtin:toy-arith?size=2", "--out", str(folder)],
        "merge": ["merge", "--base", model, "--tuned", model, "--out", str(folder), "--no-progress"],
        "drqa-data": ["drqa-data", "--model", model, "--data", "builtin:toy-arith?size=4", "--out", str(folder)],
        "prepare-model": ["prepare-model", "tiny-llama", "--out", str(folder)],
        "study": ["study", "--out", str(folder), "--recipes", "dler", "--penalties", "kimi", "--seeds", "0"],
    }[command]
    rc = cli.main(args)
    line = _error_line(capsys.readouterr().err, command)
    assert rc == 2 and str(folder) in line
    assert _digests(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# ------------------------------------------------------------------------- 2. merge onto itself or /


def test_merge_refuses_the_root_and_an_output_that_is_holds_or_sits_inside_an_input(tiny_llama_dir, tmp_path, capsys):
    base, tuned = tmp_path / "models" / "base", tmp_path / "models" / "tuned"
    shutil.copytree(tiny_llama_dir, base)
    shutil.copytree(tiny_llama_dir, tuned)
    before = _digests(tmp_path / "models")
    for out in ("/", tuned, base / "merged", tmp_path / "models"):
        rc = cli.main(["merge", "--base", str(base), "--tuned", str(tuned), "--out", str(out), "--overwrite"])
        line = _error_line(capsys.readouterr().err, "merge")
        assert rc == 2 and str(out) in line, line
        assert _digests(tmp_path / "models") == before, f"--out {out} touched the inputs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert not any(p.name.startswith(".") for p in Path("/").iterdir() if ".tmp-" in p.name)


def test_overwrite_never_replaces_the_root_the_home_folder_or_the_current_folder(tmp_path, monkeypatch):
    from trainer.fsutil import UserError, check_output

    home, work = tmp_path / "home", tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for out, why in (("/", "root"), (home, "home folder"), (work, "current folder"), (".", "current folder")):
        with pytest.raises(UserError, match=why):
            check_output(Path(out), "eval", overwrite=True)
    assert (work / "notes.txt").read_text() == "mine\n"


# ------------------------------------------------------------------- 3. damaged checkpoints, --from-step


def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    bad = run / "checkpoints" / "step-00000002"
    _flip_byte(bad / "model" / "model.safetensors")
    assert _train("--resume", str(run)) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 1 and str(bad) in skipped[0] and "sha256 mismatch" in skipped[0]
    assert f"resumed from {run / 'checkpoints' / 'step-00000001'}" in captured.out
    assert _steps(run) == [1, 2]
    # the damaged one is set aside (kept), and the new step 2 verifies
    assert [p.name.rsplit("-", 1)[0] for p in (run / "checkpoints").glob("abandoned-*")] == ["abandoned-step-00000002"]
    from trainer.checkpoint.verify import verify_checkpoint

    verify_checkpoint(bad)


def test_from_step_resumes_that_checkpoint_and_sets_the_later_ones_aside(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    later = _digests(run / "checkpoints" / "step-00000002")
    assert _train("--resume", str(run), "--from-step", "1") == 0
    assert f"resumed from {run / 'checkpoints' / 'step-00000001'}" in capsys.readouterr().out
    (aside,) = (run / "checkpoints").glob("abandoned-step-00000002-*")
    assert _digests(aside) == later, "the abandoned timeline's checkpoint is kept byte for byte"
    assert _steps(run) == [1, 2]
    rc = _train("--resume", str(run), "--from-step", "7")
    assert rc == 2 and "--from-step" in _error_line(capsys.readouterr().err)


def test_resume_with_every_checkpoint_damaged_is_one_line_with_a_start_over_command_that_works(
    finished_run, tmp_path, capsys
):
    run = _copy(finished_run, tmp_path)
    for step in (1, 2):
        _flip_byte(run / "checkpoints" / f"step-{step:08d}" / "optimizer.pt")
    before = _digests(run)
    assert _train("--resume", str(run)) == 2
    err = capsys.readouterr().err
    line = _error_line(err)
    assert str(run) in line and "none of its 2 checkpoints verifies" in line
    assert len([x for x in err.splitlines() if "skipping checkpoint" in x]) == 2
    assert _digests(run) == before, "a failed resume changes nothing"
    command = line.split("`")[1]
    argv = shlex.split(command)
    assert argv[:2] == ["dler", "train"]
    assert cli.main(argv[1:] + ["run.steps=1", "--no-progress"]) == 0
    assert (tmp_path / "run-restart" / "checkpoints" / "step-00000001").is_dir()


# ----------------------------------------------------------------------------- 4. a failed start


def test_a_failed_start_can_be_started_over_and_both_messages_say_how(demo_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the engine starts: config.yaml and metrics.jsonl are there

    monkeypatch.setattr("trainer.train.make_engine", interrupted)
    assert _train(*_overrides(demo_model, out, 1)) == 130
    monkeypatch.undo()
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").read_text() == ""
    capsys.readouterr()

    assert _train("--resume", str(out)) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(out) in line and "no complete checkpoint" in line
    command = line.split("`")[1]
    assert shlex.split(command) == ["dler", "train", str(out / "config.yaml"), f"run.out={out}"]
    assert cli.main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    assert _steps(out) == [1] and (out / "checkpoints" / "step-00000001").is_dir()


# ------------------------------------------------------------ 5. read-only, full disk, torn metrics


def test_a_read_only_run_out_is_one_line_and_leaves_the_mount_untouched(demo_model, tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "1m", read_only=True, files={"mine.txt": "mine\n"}) as ro:
        before = _digests(ro)
        rc = _train(*_overrides(demo_model, ro / "run", 1))
        line = _error_line(capsys.readouterr().err)
        assert rc == 2 and str(ro / "run") in line and "read-only" in line
        assert _digests(ro) == before and sorted(p.name for p in ro.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("size", ["128k", "512k"], ids=["weights-do-not-fit", "optimizer-does-not-fit"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(
    size, demo_model, tmp_path, capsys
):
    # 128k: model.safetensors (~320 KB) fails (safetensors' error); 512k: optimizer.pt (~660 KB) fails
    # (torch's zip writer, whose message has no errno: the full disk is found by its free space).
    with _tmpfs(tmp_path / "small", size, files={"mine.txt": "mine\n"}) as disk:
        before = (disk / "mine.txt").read_bytes()
        rc = _train(*_overrides(demo_model, disk / "run", 1))
        line = _error_line(capsys.readouterr().err)
        checkpoint = disk / "run" / "checkpoints" / "step-00000001"
        assert rc == 2 and str(checkpoint) in line and "disk is full" in line, line
        assert list((disk / "run" / "checkpoints").iterdir()) == [], "no partial checkpoint is left"
        assert (disk / "mine.txt").read_bytes() == before


def test_a_torn_last_metrics_line_is_dropped_on_resume_with_one_warning(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "accuracy": 0.')  # the process died mid-write
    assert _train("--resume", str(run), "run.steps=3") == 0
    err = capsys.readouterr().err
    torn = [line for line in err.splitlines() if "torn" in line]
    assert len(torn) == 1 and str(run / "metrics.jsonl") in torn[0]
    assert _steps(run) == [1, 2, 3]


# ---------------------------------------------------------------------- 6. a stop during the last step


def test_sigterm_during_the_last_step_stops_after_the_checkpoint_without_the_final_evaluation(
    demo_model, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    evaluated = []
    evaluate, record = HeldOutEval.run, Trainer.record

    def counting_evaluate(self, label):
        evaluated.append(label)
        return evaluate(self, label)

    def record_then_terminate(self, step, *args):
        result = record(self, step, *args)
        signal.raise_signal(signal.SIGTERM)  # as a cluster's scheduler does, during the last step
        return result

    monkeypatch.setattr(HeldOutEval, "run", counting_evaluate)
    monkeypatch.setattr(Trainer, "record", record_then_terminate)
    assert _train(*_overrides(demo_model, out, 1)) == 130
    assert evaluated == ["before training"], "no evaluation runs after a stop request"
    assert (out / "checkpoints" / "step-00000001").is_dir()
    said = capsys.readouterr().out
    (hint,) = [line for line in said.splitlines() if "final evaluation was skipped" in line]
    argv = shlex.split(hint.split("run it with: ", 1)[1])
    args = cli.build_parser().parse_args(argv[1:])  # a command `dler eval` accepts as it is
    assert args.command == "eval" and args.model == [f"step-1={out / 'checkpoints' / 'step-00000001' / 'model'}"]


# ----------------------------------------------------------------------------- 7. a diverged run


def test_a_learning_rate_that_blows_up_the_policy_stops_the_run_and_saves_nothing_non_finite(
    demo_model, tmp_path, capsys
):
    out = tmp_path / "run"
    rc = _train(*_overrides(demo_model, out, 3, "optim.lr=1e9"))
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and "diverged" in line and str(out) in line
    from safetensors.torch import load_file

    for weights in out.glob("checkpoints/step-*/model/model.safetensors"):
        for name, tensor in load_file(str(weights)).items():
            assert bool(torch.isfinite(tensor).all()), f"{weights}: {name} is not finite"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and not math.isfinite(records[-1]["loss"]), "the step that diverged is logged"
