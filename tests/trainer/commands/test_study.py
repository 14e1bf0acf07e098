"""`dler study`: the plan, the per-cell statistics against hand-computed values, a smoke-size study
(two cells, one seed, two steps each, the demo's policy at test size on the transformers engine) end to end,
including a re-run that skips the finished runs; with a stand-in for `dler train` (tests/helpers/fake_train.py):
resuming, a failed run, Ctrl-C (the run's checkpoint first, then exit 130) and a run that will not stop; the
study's folder (refused when it is the user's, marked, locked)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import cli
from trainer.commands.study import (
    PENALTIES,
    RECIPES,
    check_overrides,
    finished_summary,
    penalty_overrides,
    plan,
    recipe_preset,
)
from trainer.commands.study_report import (
    blocked_permutation_test,
    cell_table,
    markdown,
    paired_table,
    sign_test,
    warm_start,
)
from trainer.devices import host_line
from trainer.fsutil import UserError

REPO = Path(__file__).parents[3]
FAKE_TRAIN = [sys.executable, str(REPO / "tests" / "helpers" / "fake_train.py")]  # a stand-in for `dler train`


def summary(acc_before, acc_after, len_before, len_after, seed=None):
    return {
        **({} if seed is None else {"seed": seed}),
        "finished": True,
        "before": {"accuracy": acc_before, "mean_length": len_before},
        "after": {"accuracy": acc_after, "mean_length": len_after},
    }


def test_the_plan_covers_every_cell_seed_by_seed():
    runs = plan(["grpo", "dler"], ["truncation", "alp"], [0, 1], steps=5)
    assert len(runs) == 8
    assert [r.seed for r in runs] == [0] * 4 + [1] * 4  # every cell at seed 0 before any at seed 1
    assert runs[0].name == "grpo-truncation-seed0-5steps"
    assert len(PENALTIES) == 10 and set(RECIPES) == {"grpo", "dler"}


def test_a_seed_recipe_or_penalty_named_twice_is_run_and_counted_once():
    runs = plan(["dler", "dler"], ["alp", "truncation", "alp"], [1, 0, 1], steps=5)
    assert [(r.penalty, r.seed) for r in runs] == [("alp", 1), ("truncation", 1), ("alp", 0), ("truncation", 0)]


def test_a_study_folder_refuses_other_overrides_than_its_runs_were_made_with(tmp_path):
    check_overrides(tmp_path, ["optim.lr=1e-5"])
    check_overrides(tmp_path, ["optim.lr=1e-5"])  # the same: the study continues
    assert json.loads((tmp_path / "overrides.json").read_text()) == ["optim.lr=1e-5"]
    with pytest.raises(UserError, match=r"made with --set \['optim.lr=1e-5'\], not \(none\).*another --out"):
        check_overrides(tmp_path, [])


def test_every_penalty_of_the_study_is_a_valid_config():
    from trainer.config import load_config

    for recipe, preset in RECIPES.items():
        for penalty in PENALTIES:
            cfg = load_config(preset, penalty_overrides(penalty, steps=30))
            assert cfg.algorithm.advantage == ("dler" if recipe == "dler" else "grpo")
    cfg = load_config("toy-cpu", penalty_overrides("schedule", steps=30))
    assert cfg.reward.budget_schedule.enabled and cfg.reward.budget_schedule.every == 7  # 30 // 4
    assert load_config("toy-cpu", penalty_overrides("gfpo", 30)).rollout.sampling.gfpo_sample_size == 16
    # LASER's bonus needs responses longer than its target to exist, or it is the truncation cell's reward x 1.5
    laser = load_config("toy-cpu", penalty_overrides("laser", 30))
    assert laser.max_response_tokens == 2 * laser.reward.penalty.length_budget == 160


def test_bad_study_arguments_are_named():
    with pytest.raises(UserError, match="unknown recipe 'ppo'"):
        plan(["ppo"], ["truncation"], [0], 5)
    with pytest.raises(UserError, match="unknown penalty 'short'"):
        plan(["dler"], ["short"], [0], 5)
    with pytest.raises(UserError, match="--steps must be >= 1"):
        plan(["dler"], ["truncation"], [0], 0)
    with pytest.raises(UserError, match="at least one recipe, one penalty, one seed and one warm start"):
        plan(["dler"], ["truncation"], [], 5)
    with pytest.raises(UserError, match="--warm-starts are SFT seeds, >= 0"):
        plan(["dler"], ["truncation"], [0], 5, warm_starts=[-1])
    with pytest.raises(UserError, match=r"--warm-starts sets each run's model.path .* --set model.path=m"):
        plan(["dler"], ["truncation"], [0], 5, warm_starts=[0, 1], extra=["model.path=m"])
    assert len(plan(["dler"], ["truncation"], [0], 5, extra=["model.path=m"])) == 1  # warm start 0: the user's


def test_cell_statistics_are_mean_and_sample_std_over_seeds():
    runs = [summary(0.8, 0.7, 100, 30), summary(0.8, 0.9, 100, 50), summary(0.6, 0.65, 120, 40)]
    (cell,) = cell_table({("dler", "alp"): runs})
    # accuracy changes -0.1, +0.1, +0.05: mean 0.05/3, sample std sqrt(sum of squared deviations / 2)
    changes = [-0.1, 0.1, 0.05]
    mean = sum(changes) / 3
    std = math.sqrt(sum((c - mean) ** 2 for c in changes) / 2)
    assert cell["runs"] == 3
    assert cell["accuracy_change"]["mean"] == pytest.approx(mean, abs=1e-12)
    assert cell["accuracy_change"]["std"] == pytest.approx(std, abs=1e-12)
    assert cell["length_change"]["mean"] == pytest.approx((-70 - 50 - 80) / 3, abs=1e-12)  # -66.67
    assert cell["length_after"]["mean"] == pytest.approx(40.0, abs=1e-12)
    start = warm_start({("dler", "alp"): runs})
    assert start["accuracy"]["mean"] == pytest.approx(2.2 / 3, abs=1e-12) and start["runs"] == 3
    # one run: no std, and the table says so by leaving the ± out
    (single,) = cell_table({("grpo", "kimi"): [summary(0.5, 0.6, 80, 20)]})
    assert single["accuracy_change"]["std"] is None
    row = markdown([single], None, {}).splitlines()[-1]
    assert row == "| grpo | kimi | 1 | +10.0 | -60.0 | 60.0% | 20.0 |"


def test_recipes_are_paired_with_grpo_by_seed_per_penalty_and_pooled():
    summaries = {
        ("grpo", "alp"): [summary(0.8, 0.70, 130, 30, seed=0), summary(0.7, 0.60, 130, 32, seed=1)],
        ("dler", "alp"): [summary(0.8, 0.75, 130, 28, seed=0), summary(0.7, 0.58, 130, 30, seed=1)],
        ("grpo", "kimi"): [summary(0.8, 0.60, 130, 20, seed=0)],
        # seed 5 has no GRPO run to pair with: left out, not paired with another seed's
        ("dler", "kimi"): [summary(0.8, 0.66, 130, 22, seed=0), summary(0.9, 0.10, 130, 22, seed=5)],
    }
    alp, kimi, pooled = paired_table(summaries)
    assert (alp["recipe"], alp["penalty"], alp["pairs"]) == ("dler", "alp", 2)
    # accuracy-change differences: (0.75-0.8)-(0.70-0.8) = +0.05 and (0.58-0.7)-(0.60-0.7) = -0.02
    assert alp["accuracy_difference"]["mean"] == pytest.approx(0.015, abs=1e-12)
    assert alp["accuracy_difference"]["std"] == pytest.approx(math.sqrt(2 * 0.035**2), abs=1e-12)
    assert alp["length_after_difference"]["mean"] == pytest.approx(-2.0, abs=1e-12)
    assert (alp["ahead"], alp["behind"]) == (1, 1)
    assert kimi["pairs"] == 1 and kimi["accuracy_difference"]["mean"] == pytest.approx(0.06, abs=1e-12)
    assert kimi["accuracy_difference"]["std"] is None
    assert pooled["penalty"] is None and pooled["pairs"] == 3 and (pooled["ahead"], pooled["behind"]) == (2, 1)
    assert pooled["sign_test_p"] == pytest.approx(1.0)
    table = markdown(cell_table(summaries), None, {}, paired_table(summaries))
    # pooled accuracy +5, -2, +6 pt: mean 3.0, std sqrt((4 + 25 + 9) / 2) = 4.36; lengths -2, -2, +2: -0.67 ± 2.31
    assert "| dler | **all penalties** | 3 | +3.0 ± 4.4 | -0.7 ± 2.3 | 2 / 1 | 1.00 |" in table


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 2**10)  # P(<= 2 of 10) both ways
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0


def _study(differences_pt):
    """{(recipe, penalty): runs} where dler's run at each penalty and seed is differences_pt[seed][penalty] points
    of accuracy above GRPO's (every run starts at 50%)."""
    summaries = {}
    for seed, row in enumerate(differences_pt):
        for k, d in enumerate(row):
            summaries.setdefault(("grpo", f"p{k}"), []).append(summary(0.5, 0.5, 100, 50, seed=seed))
            summaries.setdefault(("dler", f"p{k}"), []).append(summary(0.5, 0.5 + d / 100, 100, 50, seed=seed))
    return summaries


def test_the_pooled_difference_is_also_tested_with_the_seed_as_the_unit():
    # 3 seeds x 3 penalties, dler ahead in all 9 pairs: the pooled sign test counts 9 independent wins
    # (p = 2 / 2^9), but the pairs of one seed share its warm start and evaluation, and 3 seeds can do no
    # better than p = 2 / 2^3 = 0.25, in both tests that take the seed as the unit
    (pooled,) = [r for r in paired_table(_study([[4, 6, 2], [1, 2, 3], [1, 5, 2]])) if r["penalty"] is None]
    assert (pooled["ahead"], pooled["behind"]) == (9, 0)
    assert pooled["sign_test_p"] == pytest.approx(2 / 2**9)
    by_seed = pooled["by_seed"]
    assert [x["seed"] for x in by_seed["per_seed"]] == [0, 1, 2] and by_seed["seeds"] == 3
    assert [x["accuracy_difference"] for x in by_seed["per_seed"]] == pytest.approx([0.04, 0.02, 8 / 300])
    assert (by_seed["seeds_ahead"], by_seed["seeds_behind"]) == (3, 0)
    assert by_seed["seed_sign_test_p"] == pytest.approx(0.25)
    assert by_seed["permutation_p"] == pytest.approx(0.25) and by_seed["permutation_exact"]

    # seed 2 now behind on the whole: its sum -6 pt against 12 and 6. Seed means +4, +2, -2: 2 ahead, 1
    # behind, p = 1. The 8 sign flips of the sums (12, 6, -6) give |totals| 12, 24, 0, 12, 12, 0, 24, 12:
    # 6 of 8 reach the observed 12, p = 0.75. The pooled sign test: 7 ahead, 2 behind, p = 2 * 46 / 512.
    (pooled,) = [r for r in paired_table(_study([[4, 6, 2], [1, 2, 3], [1, -5, -2]])) if r["penalty"] is None]
    assert (pooled["ahead"], pooled["behind"]) == (7, 2)
    assert pooled["sign_test_p"] == pytest.approx(2 * (1 + 9 + 36) / 2**9)
    by_seed = pooled["by_seed"]
    assert (by_seed["seeds_ahead"], by_seed["seeds_behind"]) == (2, 1)
    assert by_seed["seed_sign_test_p"] == pytest.approx(1.0)
    assert by_seed["permutation_p"] == pytest.approx(0.75)

    table = markdown([], None, {}, paired_table(_study([[4, 6, 2], [1, 2, 3], [1, -5, -2]])))
    assert "| dler | 3 | +4.0 (seed 0), +2.0 (seed 1), -2.0 (seed 2) | 2 / 1 | 1.00 | 0.75 |" in table
    assert "- pooled sign test (the table above): every (penalty, seed) pair independent" in table
    assert "- sign test over blocks: the blocks (seed) independent" in table
    assert "- permutation test blocked by seed (of the pooled mean difference): the blocks independent" in table
    # the per-penalty rows are unchanged and carry no seed tests (one pair per seed there)
    assert all("by_seed" not in r for r in paired_table(_study([[4, 6, 2]])) if r["penalty"] is not None)


def test_the_blocked_permutation_test_flips_each_seeds_sum_whole():
    # sums 1, 2, 3: |totals| over the 8 flips are 6, 0, 2, 4 (each twice): only the observed and its negation
    assert blocked_permutation_test([1.0, 2.0, 3.0]) == (pytest.approx(2 / 8), True)
    assert blocked_permutation_test([0.1, -0.1]) == (1.0, True)  # a total of 0 (up to rounding): p = 1
    # beyond EXACT_PERMUTATION_SEEDS seeds, random assignments: 20 equal sums have an exact p of 2 / 2^20
    p, exact = blocked_permutation_test([0.01] * 20)
    assert not exact and p <= 1e-4


def test_only_a_whole_finished_summary_counts(tmp_path):
    assert finished_summary(tmp_path) is None  # none
    (tmp_path / "summary.json").write_text('{"finished": true, "before": {')  # cut short
    assert finished_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text(json.dumps({**summary(0.5, 0.5, 1, 1), "finished": False}))
    assert finished_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text(json.dumps(summary(0.5, 0.5, 1, 1)))
    assert finished_summary(tmp_path)["after"]["accuracy"] == 0.5


SMOKE = [
    "rollout.engine=hf",
    "rollout.sampling.prompts_per_step=2",
    "rollout.sampling.samples_per_prompt=4",
    "rollout.sampling.max_rounds=1",
    "algorithm.mini_batch_prompts=1",
    "eval.limit=4",
    "eval.samples_per_prompt=1",
    "eval.max_tokens=80",
]


def test_smoke_study_writes_its_tables_and_a_rerun_skips_finished_runs(demo_model, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--out", str(out), "--recipes", "grpo,dler", "--penalties", "truncation", "--seeds", "0"]
    args += ["--steps", "2", f"--set=model.path={demo_model}"] + [f"--set={s}" for s in SMOKE]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and "[1/2] grpo truncation seed 0" in lines[0] and "skipped" not in printed
    for name in ("grpo-truncation-seed0-2steps", "dler-truncation-seed0-2steps"):
        assert finished_summary(out / "runs" / name)["steps"] == 2
        log = (out / "logs" / f"{name}.log").read_text()
        assert "-m trainer train" in log and "eval before training" in log  # the run's output is in its log...
    assert "eval before training" not in printed  # ...not on the console

    data = json.loads((out / "study.json").read_text())
    assert [(c["recipe"], c["penalty"], c["runs"]) for c in data["cells"]] == [
        ("grpo", "truncation", 1),
        ("dler", "truncation", 1),
    ]
    assert data["warm_start"]["runs"] == 2 and data["header"]["steps per run"] == 2
    assert data["header"]["machine"] == host_line()  # the CPU model: another one gives another warm start
    assert [(p["recipe"], p["penalty"], p["pairs"]) for p in data["paired"]] == [("dler", "truncation", 1)]
    table = (out / "study.md").read_text()
    assert "| grpo | truncation | 1 |" in table and "| dler | truncation | 1 |" in table
    assert "## Paired with grpo at the same penalty and seed" in table
    assert (out / "pareto.png").stat().st_size > 0
    timings = json.loads((out / "timings.json").read_text())

    assert cli.main(args) == 0  # everything finished: nothing runs again
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 2
    assert json.loads((out / "timings.json").read_text()) == timings
    assert json.loads((out / "study.json").read_text())["cells"] == data["cells"]


def _fake_checkpoint(run_dir: Path, step: int) -> None:
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / ".dler-complete").write_text("")


def _argv(run_dir: Path) -> list[list[str]]:
    """The command lines the stand-in for dler train was started with in ``run_dir``."""
    return [json.loads(line) for line in (run_dir / "argv.jsonl").read_text().splitlines()]


def test_an_interrupted_run_resumes_from_its_checkpoint_and_a_fresh_one_starts(tmp_path, monkeypatch):
    from trainer.commands import study

    monkeypatch.setenv("FAKE_TRAIN", "finish")
    run = study.Run("dler", "alp", 3, 5)
    run_dir = tmp_path / "runs" / run.name
    assert run.command(run_dir, [])[:4] == [sys.executable, "-m", "trainer", "train"]  # dler train, by default
    study.run_one(run, tmp_path, ["eval.limit=4"], train=FAKE_TRAIN)  # no folder yet: a fresh start
    (fresh,) = _argv(run_dir)
    assert fresh[-1] == "--no-progress" and fresh[0] == "toy-cpu"
    assert "reward.penalty.name=alp" in fresh and "run.seed=3" in fresh
    assert fresh.index("eval.limit=4") > fresh.index("reward.penalty.name=alp")  # the user's overrides last
    _fake_checkpoint(run_dir, 2)
    study.run_one(run, tmp_path, ["eval.limit=4"], train=FAKE_TRAIN)  # a checkpoint: resume it, with its own config
    assert _argv(run_dir)[1] == ["--resume", str(run_dir), "--no-progress"]
    assert (tmp_path / "logs" / f"{run.name}.log").read_text().count("$ ") == 2


def test_a_failed_run_stops_the_study_and_names_its_log(tmp_path, monkeypatch):
    from trainer.commands import study

    monkeypatch.setenv("FAKE_TRAIN", "fail")
    with pytest.raises(UserError, match=r"grpo-kimi-seed0-5steps: dler train exited with 2; .*logs/grpo-kimi"):
        study.run_study(tmp_path, [study.Run("grpo", "kimi", 0, 5)], say=lambda line: None, train=FAKE_TRAIN)


# A `dler study` whose runs are the stand-in (FAKE_TRAIN_COMMAND, JSON), as a user starts it from a terminal.
STUDY_WITH_FAKE_TRAIN = """
import json, sys
from trainer import cli
from trainer.commands import study
study.TRAIN_COMMAND = tuple(json.loads(sys.argv[1]))
# the stand-in needs no warm start: say which the study would build (seconds to minutes each) instead
study.build_warm_starts = lambda warm_starts, say=print: say(f"warm starts to build: {list(warm_starts)}")
sys.exit(cli.main(sys.argv[2:]))
"""


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} never appeared: {proc.communicate()}")
        time.sleep(0.05)


def test_ctrl_c_stops_the_running_run_after_its_checkpoint_and_the_study_with_130(tmp_path):
    """Ctrl-C in a terminal signals the study's whole process group: the run gets one SIGINT (the study's), finishes
    its step and checkpoint, and a second `dler study` resumes it from there."""
    out = tmp_path / "study"
    run_dir = out / "runs" / "dler-truncation-seed0-1steps"
    args = [
        "study",
        "--out",
        str(out),
        "--recipes",
        "dler",
        "--penalties",
        "truncation",
        "--seeds",
        "0",
        "--steps",
        "1",
    ]
    command = [sys.executable, "-c", STUDY_WITH_FAKE_TRAIN, json.dumps(FAKE_TRAIN), *args]
    env = {**os.environ, "FAKE_TRAIN": "stop"}
    kw = dict(cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    proc = subprocess.Popen(command, **kw)
    _wait_for(run_dir / "started", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the foreground process group
    said, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert (run_dir / "stopped").read_text() == "1", "the run finished its step and got one SIGINT, not two"
    assert "dler study: stopping: dler-truncation-seed0-1steps finishes its step and saves a checkpoint" in said
    assert err.strip().splitlines()[-1] == (
        "dler study: interrupted: dler-truncation-seed0-1steps stopped (dler train exited with 130); run the same "
        "command again to resume the study (dler-truncation-seed0-1steps resumes from its checkpoint step-00000001)"
    )
    env["FAKE_TRAIN"] = "finish"
    done = subprocess.run(command, **{**kw, "env": env}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _argv(run_dir)[-1][0] == "--resume", "the second study resumed the run from its checkpoint"


def test_a_run_that_does_not_stop_in_time_is_killed_and_the_study_says_so(tmp_path, monkeypatch):
    import threading

    from trainer.commands import study

    monkeypatch.setenv("FAKE_TRAIN", "ignore")  # a run that never ends, SIGINT or not
    run = study.Run("dler", "alp", 0, 5)
    run_dir = tmp_path / "runs" / run.name
    stop, said = study.StopSignals(), []

    def ctrl_c_once_started():
        while not (run_dir / "started").exists():
            time.sleep(0.05)
        stop.requested += 1  # what the study's SIGINT handler does

    threading.Thread(target=ctrl_c_once_started, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(study.Interrupted) as caught:
        study.run_one(run, tmp_path, [], stop, train=FAKE_TRAIN, stop_timeout=1.0, say=said.append)
    assert time.monotonic() - started < 60
    assert str(caught.value) == (
        f"{run.name} did not stop within 1 s and was killed; run the same command again to resume the study "
        f"({run.name} had no checkpoint yet and starts over)"
    )
    assert said == [f"dler study: stopping: {run.name} finishes its step and saves a checkpoint (waiting up to 1 s; "
                    "Ctrl-C again stops it at once)"]  # fmt: skip
    with pytest.raises(ProcessLookupError):
        os.kill(int((run_dir / "started").read_text()), 0)  # killed and reaped


# ------------------------------------------------------------------------------------------- the study folder

STUDY_ARGS = ["--recipes", "dler", "--penalties", "truncation", "--seeds", "0", "--steps", "1"]


def test_a_folder_of_the_users_own_files_is_refused_and_its_overrides_json_never_read(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "overrides.json").write_text('{"my": "settings"}\n')  # a user's file that happens to share the name
    (folder / "notes.txt").write_text("mine\n")
    assert cli.main(["study", "--out", str(folder), *STUDY_ARGS]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line == (
        f"dler study: error: {folder} is not empty and was not made by `dler study`: nothing in it is touched; "
        "choose another --out (a new or empty folder)"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "overrides.json"]
    assert (folder / "overrides.json").read_text() == '{"my": "settings"}\n'


def test_a_study_folder_is_marked_and_locked_and_a_study_from_before_the_marker_is_kept(tmp_path, capsys):
    from trainer.commands import study
    from trainer.fsutil import owner

    new = tmp_path / "new"
    with study.claim_folder(new):
        assert owner(new) == "study"
        rc = cli.main(["study", "--out", str(new), *STUDY_ARGS])  # a second study on the same folder
        line = capsys.readouterr().err.strip()
        assert rc == 2 and line.startswith(f"dler study: error: --out {new} is in use by another `dler study` (pid ")
    with study.claim_folder(new):  # let go at the end: the study's own folder is continued
        pass

    old = tmp_path / "old"  # a study written before the marker: its overrides and its runs' logs
    (old / "logs").mkdir(parents=True)
    (old / "overrides.json").write_text("[]")
    (old / "logs" / "dler-truncation-seed0-30steps.log").write_text("$ dler train\n")
    with study.claim_folder(old):
        assert owner(old) == "study"


def test_the_objective_axis_is_a_recipe_with_another_objective_paired_with_its_own_recipe():
    from trainer.config import load_config

    (run,) = plan(["dler+gspo"], ["truncation"], [2], steps=5)
    assert run.name == "dler+gspo-truncation-seed2-5steps"
    command = run.command(Path("OUT"), ["optim.lr=1e-5"], train=["dler", "train"])
    assert command[2] == "toy-cpu" and "algorithm.objective=gspo" in command
    assert command[-2] == "optim.lr=1e-5"  # the user's overrides come last
    # the preset's PPO bounds give way to the objective's defaults; an objective without bounds loads too
    for objective, bounds in (("gspo", {"eps_low": 3e-4, "eps_high": 4e-4}), ("sapo", {})):
        preset, overrides = recipe_preset(f"dler+{objective}")
        cfg = load_config(preset, overrides)
        assert cfg.algorithm.objective == objective
        assert {k: v for k, v in cfg.algorithm.objective_params().items() if k.startswith("eps")} == bounds
    with pytest.raises(UserError, match=r"unknown objective 'gpso' in recipe 'dler\+gpso'; the objectives are"):
        plan(["dler+gpso"], ["truncation"], [0], 5)
    with pytest.raises(UserError, match=r"unknown recipe 'ppo\+gspo'"):
        plan(["ppo+gspo"], ["truncation"], [0], 5)
    summaries = {
        ("dler", "truncation"): [summary(0.8, 0.70, 130, 30, seed=0), summary(0.7, 0.60, 130, 32, seed=1)],
        ("dler+gspo", "truncation"): [summary(0.8, 0.75, 130, 28, seed=0), summary(0.7, 0.58, 130, 30, seed=1)],
    }
    (row,) = paired_table(summaries, baseline="dler")
    assert (row["recipe"], row["pairs"]) == ("dler+gspo", 2)
    assert row["accuracy_difference"]["mean"] == pytest.approx(0.015, abs=1e-12)
    assert "## Paired with dler at the same penalty and seed" in markdown([], None, {}, [row], baseline="dler")


# ------------------------------------------------------------------------------------------- the warm-start axis


def test_warm_starts_are_an_axis_of_the_plan_with_their_own_model_and_names():
    runs = plan(["grpo", "dler"], ["truncation"], [0, 1], steps=80, warm_starts=[0, 2])
    assert [(r.seed, r.warm_start, r.recipe) for r in runs] == [
        (s, w, r) for s in (0, 1) for w in (0, 2) for r in ("grpo", "dler")
    ]  # seed by seed, and within a seed every warm start
    assert runs[0].name == "grpo-truncation-seed0-80steps"  # warm start 0 keeps the names from before the axis
    assert runs[2].name == "grpo-truncation-warm2-seed0-80steps" and runs[2].block == (2, 0)
    assert not any(a.startswith("model.path=") for a in runs[0].command(Path("OUT"), []))
    command = runs[2].command(Path("OUT"), ["eval.limit=4"], train=["dler", "train"])
    assert "model.path=demo-verbose-arith?seed=2" in command and command.index("eval.limit=4") > command.index(
        "model.path=demo-verbose-arith?seed=2"
    )
    from trainer.config import load_config

    assert load_config("toy-cpu", command[3:-1]).model.path == "demo-verbose-arith?seed=2"


def _warm_study(before, after):
    """{(recipe, "truncation"): runs} over warm starts 0, 1 and seeds 0, 1: before[w] and after[recipe][w][s]."""
    return {
        (recipe, "truncation"): [
            {**summary(before[w], after[recipe][w][s], 130, 30, seed=s), "warm_start": w}
            for w in (0, 1)
            for s in (0, 1)
        ]
        for recipe in ("grpo", "dler")
    }


def test_with_warm_starts_runs_pair_by_warm_start_and_seed_and_the_report_has_each_warm_start(tmp_path):
    from trainer.commands.study_report import write_report

    # warm start 1 starts lower (70%) and both recipes gain there; warm start 0 starts at 80% and both lose
    summaries = _warm_study(
        before=[0.8, 0.7],
        after={"grpo": [[0.72, 0.70], [0.74, 0.76]], "dler": [[0.78, 0.75], [0.73, 0.80]]},
    )
    (pair,) = paired_table(summaries)
    # pairs by (warm start, seed): +6, +5, -1, +4 pt; paired across warm starts they would differ
    assert pair["pairs"] == 4 and (pair["ahead"], pair["behind"]) == (3, 1)
    nine = _study([[4, 6, 2], [1, 2, 3], [1, 5, 2]])  # 9 pairs, all ahead: p = 2 / 2^9, shown as such, not 0.00
    assert "| 9 / 0 | 0.0039 |" in markdown(cell_table(nine), None, {}, paired_table(nine))
    assert pair["accuracy_difference"]["mean"] == pytest.approx(0.035, abs=1e-12)
    notes = write_report(tmp_path, summaries, {"warm starts": "0, 1"})
    assert notes == []
    data = json.loads((tmp_path / "study.json").read_text())
    rows = {(r["recipe"], r["warm_start"]): r for r in data["per_warm_start"]}
    assert rows["dler", 1]["accuracy_change"]["mean"] == pytest.approx(0.065, abs=1e-12)  # (0.03 + 0.10) / 2
    assert rows["grpo", 0]["accuracy_change"]["mean"] == pytest.approx(-0.09, abs=1e-12)
    assert data["cells"][0]["per_run"]["warm_start"] == [0, 0, 1, 1]
    table = (tmp_path / "study.md").read_text()
    assert (
        "## Per warm start" in table
        and "| dler | truncation | 1 | 2 | 70.0% | 76.5% | +6.5 ± 4.9 | 130.0 -> 30.0 |" in table
    )
    assert "## Paired with grpo at the same penalty and warm start and seed" in table
    assert (tmp_path / "warm_starts.png").stat().st_size > 0 and (tmp_path / "pareto.png").stat().st_size > 0


def test_one_warm_start_leaves_the_report_as_it_was(tmp_path):
    from trainer.commands.study_report import write_report

    runs = {
        ("dler", "alp"): [summary(0.8, 0.7, 100, 30, seed=0)],
        ("grpo", "alp"): [summary(0.8, 0.6, 100, 30, seed=0)],
    }
    write_report(tmp_path, runs, {})
    table = (tmp_path / "study.md").read_text()
    assert "Per warm start" not in table and "## Paired with grpo at the same penalty and seed" in table
    assert not (tmp_path / "warm_starts.png").exists()


def test_a_study_over_warm_starts_builds_each_once_and_runs_from_it(tmp_path):
    out = tmp_path / "study"
    args = ["study", "--out", str(out), "--recipes", "grpo,dler", "--penalties", "truncation", "--seeds", "0"]
    args += ["--warm-starts", "0,1", "--steps", "1"]
    command = [sys.executable, "-c", STUDY_WITH_FAKE_TRAIN, json.dumps(FAKE_TRAIN), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_TRAIN": "finish"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "warm starts to build: [0, 1]" in first.stdout
    assert "[3/4] grpo truncation warm start 1 seed 0" in first.stdout
    (fresh,) = _argv(out / "runs" / "dler-truncation-warm1-seed0-1steps")
    assert "model.path=demo-verbose-arith?seed=1" in fresh
    data = json.loads((out / "study.json").read_text())
    assert [r["warm_start"] for r in data["per_warm_start"]] == [0, 1, 0, 1]
    assert data["header"]["warm starts"].startswith("0, 1")
    assert "--warm-starts 0,1" in data["header"]["command"]
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "warm starts to build: []" in again.stdout  # every run finished
