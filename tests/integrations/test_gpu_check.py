"""``make gpu-check`` on the CPU: ``python -m bench.gpu_check --smoke`` in a subprocess, as the CI runs it, with
the packages the GPU machine lacks hidden (helpers/gpu_machine_site), so that its imports are the ones that
machine can satisfy. Checks the report's keys, each stage's outcome on a machine without CUDA, and that a
failing or hanging stage is reported as failed while the next stage still runs; and, as pure functions on any
machine, the budget arithmetic under the whole check's deadline and the build stage's tree export, ptxas spill
report and wheel tag."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the package bench.gpu_check (bench: a namespace package)
sys.path.insert(1, str(ROOT / "bench"))  # the benchmark scripts, which import each other by their bare names
from cuda_timing import MIN_TIMED_CALLS, repetition_ms  # noqa: E402

from bench.gpu_check.correctness import gpu_test_files  # noqa: E402
from bench.gpu_check.pytest_results import counts_from_verbose_output, outcomes_by_file  # noqa: E402
from bench.gpu_check.runner import MIN_STAGE_S, stage_budget  # noqa: E402
from bench.gpu_check.stages import STAGES, TOTAL_BUDGET_S, stage_function  # noqa: E402
from bench.gpu_check.wheel import (  # noqa: E402
    WHEEL_ARCH_LIST,
    expected_local_tag,
    export_tree,
    local_tag,
    ptxas_problems,
    ptxas_report,
    source_files,
    wheel_archs,
)

GPU_MACHINE_SITE = Path(__file__).parents[1] / "helpers" / "gpu_machine_site"
STAGES_IN_ORDER = ["environment", "build", "correctness", "kernel_bench", "linear_bench", "train_step"]
without_cuda = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="asserts the outcomes on a machine without CUDA"
)


def gpu_check(out: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # this suite's conftest sets it
    env["PYTHONPATH"] = os.pathsep.join([str(GPU_MACHINE_SITE), str(ROOT)])
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--smoke", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    report = json.loads((out / "gpu_report.json").read_text())
    return proc, report


def by_name(report: dict) -> dict:
    return {s["name"]: s for s in report["stages"]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.perf_counter()
    proc, report = gpu_check(out)
    return out, proc, report, time.perf_counter() - start


@without_cuda
def test_the_smoke_run_reports_every_stage_in_the_issues_order_with_its_time_and_budget(smoke):
    out, proc, report, _ = smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(report) == {"command", "smoke", "machine", "total_s", "total_budget_s", "stages"}
    assert report["smoke"] is True and report["total_budget_s"] <= 480  # 8 minutes on a GPU
    assert [s["name"] for s in report["stages"]] == STAGES_IN_ORDER
    for stage in report["stages"]:
        assert {"name", "title", "status", "reason", "elapsed_s", "budget_s"} <= set(stage), stage["name"]
        assert stage["status"] in ("passed", "failed", "skipped", "not run")
        assert 0 < stage["elapsed_s"] < stage["budget_s"], stage["name"]
        assert f"{stage['name']}:" in proc.stdout  # each stage's line, with its elapsed time, on the console
    assert set(report["machine"]) == {"date", "gpu", "driver", "cuda", "torch", "triton", "transformers", "python",
                                      "nvcc"}  # fmt: skip
    assert report["machine"]["gpu"] == "none (no CUDA device)"
    markdown = (out / "gpu_report.md").read_text()
    assert "| # | stage | status | seconds | budget s | reason |" in markdown


@without_cuda
def test_on_a_cpu_the_gpu_only_parts_are_skipped_and_everything_else_ran(smoke):
    _, _, report, _ = smoke
    stages = by_name(report)
    assert {name: s["status"] for name, s in stages.items()} == {
        "environment": "passed",
        "build": "skipped",
        "correctness": "passed",
        "kernel_bench": "passed",
        "linear_bench": "passed",
        "train_step": "passed",
    }
    assert stages["build"]["reason"].startswith("smoke mode")
    env = stages["environment"]["figures"]
    assert env["copy"]["gbps"] > 0 and env["matmul"]["tflops"] > 0
    assert env["optional_packages"] == {"liger_kernel": False, "math_verify": False, "vllm": False,
                                        "flash_attn": False}  # fmt: skip
    parts = {p["name"].split(" (")[0].split(",")[0]: p for p in stages["correctness"]["parts"]}
    gpu_tests = parts["kernel tests on CUDA"]  # the GPU machine's exact command: collected here, all skipped
    assert gpu_tests["status"] == "skipped" and gpu_tests["reason"].endswith("selected tests skipped: no CUDA device")
    assert gpu_tests["skipped"] > 0 and gpu_tests["passed"] == gpu_tests["failed"] == 0
    assert parts["kernel tests"]["status"] == "passed" and parts["kernel tests"]["passed"] > 0
    train = parts["dler train"]
    assert train["status"] == "passed" and [s["step"] for s in train["steps"]] == [1, 2, 3]


@without_cuda
def test_the_report_says_the_engine_sleep_sequence_ran_with_an_engine_that_cannot_sleep(smoke):
    out, _, report, _ = smoke
    correctness = by_name(report)["correctness"]
    (train,) = [p for p in correctness["parts"] if p["name"].startswith("dler train")]
    assert train["engine_can_sleep"] is False  # the transformers engine's own answer
    (note,) = correctness["notes"]
    assert "reports that it cannot sleep" in note and "was NOT exercised" in note
    assert f"- {note}" in (out / "gpu_report.md").read_text()


@without_cuda
def test_the_policy_update_reports_how_it_counts_flops_and_which_steps_it_times(smoke):
    out, _, report, _ = smoke
    stage = by_name(report)["train_step"]
    (note,) = stage["notes"]
    figures = stage["figures"]
    assert f"{figures['flops_per_step'] / 1e12:.3f} TFLOP" in note and "6 * P * T" in note
    assert "6 * layers * d_attn * S^2" in note and "medians over 2 timed steps after 1 untimed warm-up" in note
    assert note in (out / "gpu_report.md").read_text()


@without_cuda
def test_the_gpu_kernel_tests_report_counts_file_by_file(smoke):
    _, _, report, _ = smoke
    parts = {p["name"]: p for p in by_name(report)["correctness"]["parts"]}
    files = [Path(f).name for f in gpu_test_files()]
    assert files[-1] == "test_cuda_oracles.py" and {"test_policy_loss.py", "test_extension.py"} <= set(files)
    for name in files:
        part = parts[f"kernel tests on CUDA (-m gpu, {name})"]
        assert part["status"] == "skipped" and part["skipped"] > 0 and part["passed"] == part["failed"] == 0, name


@without_cuda
def test_comparisons_that_cannot_run_here_are_not_run_with_the_reason_never_passed(smoke):
    _, _, report, _ = smoke
    stages = by_name(report)
    (shape,) = stages["kernel_bench"]["figures"]["shapes"]
    ran = {r["impl"] for r in shape["rows"]}
    assert "eager reference" in ran and "dler triton" not in ran and "liger triton_grpo_loss" not in ran
    assert shape["not_run"]["liger triton_grpo_loss"] == "needs CUDA"
    (linear,) = stages["linear_bench"]["figures"]["shapes"]
    assert "liger LigerFusedLinearGRPOLoss" not in {r["impl"] for r in linear["rows"]}
    assert "not installed" in linear["not_run"]["liger LigerFusedLinearGRPOLoss"]
    targets = [t for s in report["stages"] for t in s.get("targets", [])]
    assert targets and all(t["met"] is None for t in targets)  # tiny shapes on a CPU judge no GPU target
    liger_targets = [t for t in stages["linear_bench"]["targets"] if "Liger" in t["target"]]
    assert liger_targets and all(t["met"] is None and t["reason"].startswith("not run") for t in liger_targets)


@without_cuda
def test_the_smoke_run_stays_within_a_ci_minute_and_a_half(smoke):
    *_, seconds = smoke
    assert seconds < 90


@without_cuda
def test_a_stage_forced_to_fail_is_reported_failed_and_the_next_stage_still_runs(tmp_path):
    proc, report = gpu_check(tmp_path, "--stages", "environment,kernel_bench", "--inject-fault", "environment=raise")
    assert proc.returncode == 1
    stages = by_name(report)
    assert stages["environment"]["status"] == "failed"
    assert "fault injected into stage environment" in stages["environment"]["reason"]
    assert "RuntimeError" in stages["environment"]["error"]
    assert stages["kernel_bench"]["status"] == "passed"  # without stage 1's figures, the next still measures
    assert stages["build"]["status"] == "not run" and stages["build"]["reason"] == "not selected (--stages)"
    assert report["machine"]["gpu"].startswith("unknown")
    assert report["machine"]["date"].startswith("20")  # the run's start, where the environment stage had none
    assert "## environment: versions, copy bandwidth, matmul rate (failed)" in (tmp_path / "gpu_report.md").read_text()


@without_cuda
def test_a_stage_past_its_budget_is_killed_with_the_commands_it_started_and_the_next_stage_still_runs(tmp_path):
    start = time.perf_counter()
    proc, report = gpu_check(tmp_path, "--stages", "environment,build", "--inject-fault", "environment=hang",
                             "--budget", "environment=3")  # fmt: skip
    assert time.perf_counter() - start < 60
    stages = by_name(report)
    assert stages["environment"]["status"] == "failed"
    assert stages["environment"]["reason"] == "timed out: killed at its budget of 3 s"
    assert 3 <= stages["environment"]["elapsed_s"] < 10
    assert stages["build"]["status"] == "skipped"
    hung = int((tmp_path / "logs" / "environment-hang.pid").read_text())  # the command the stage was waiting on
    assert not alive(hung)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended; only its exit status is left to collect


@without_cuda
def test_unknown_stage_names_are_refused_with_the_list_of_stages(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path),
                           "--stages", "environment,kernels"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown stage(s) kernels; the stages are environment, build, correctness" in proc.stderr


@without_cuda
def test_a_wheels_folder_without_wheels_fails_the_environment_stage_with_the_reason(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    proc, report = gpu_check(tmp_path / "out", "--stages", "environment", "--wheels", str(empty))
    env = by_name(report)["environment"]
    assert env["status"] == "failed" and env["reason"] == "the carried wheels did not install"
    (part,) = env["parts"]
    assert part["name"] == "carried wheels" and part["reason"] == f"--wheels {empty}: no *.whl there"
    assert env["figures"]["copy"]["gbps"] > 0  # the rest of the stage still measured


@without_cuda
def test_a_carried_wheel_is_installed_into_the_runs_own_site_within_the_stages_budget(tmp_path):
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    dist = "carried_probe-0.1.dist-info"
    with zipfile.ZipFile(wheels / "carried_probe-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("carried_probe/__init__.py", "")
        whl.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: carried-probe\nVersion: 0.1\n")
        whl.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}/RECORD", "")
    proc, report = gpu_check(tmp_path / "out", "--stages", "environment", "--wheels", str(wheels))
    env = by_name(report)["environment"]
    assert env["status"] == "passed", env
    (part,) = env["parts"]
    assert part["status"] == "passed" and part["wheels"] == ["carried_probe-0.1-py3-none-any.whl"]
    assert 0 < part["seconds"] < env["budget_s"]
    assert (tmp_path / "out" / "wheels-site" / "carried_probe" / "__init__.py").exists()


# ---------------------------------------------------------------- the budget arithmetic (any machine)


def test_a_stage_gets_its_own_budget_plus_what_the_earlier_stages_left_unused():
    # Stages of 20 s and 100 s took 30 s together: the third (130 s of its own) gets the 90 s they left.
    assert stage_budget(130, planned_s=120, elapsed_s=30, total_s=480) == 220


def test_a_stage_that_ran_long_takes_nothing_from_the_next_stages_own_budget_until_the_deadline():
    # The earlier stages overran their 120 s by 6 s (the kill's grace): the next keeps its own 130 s...
    assert stage_budget(130, planned_s=120, elapsed_s=126, total_s=480) == 130
    # ...unless the deadline is nearer: 480 - 400 = 80 s left.
    assert stage_budget(130, planned_s=390, elapsed_s=400, total_s=480) == 80


def test_the_deadline_cuts_every_budget_when_the_total_is_smaller_than_the_stages_sum():
    assert stage_budget(100, planned_s=0, elapsed_s=0, total_s=60) == 60
    assert stage_budget(100, planned_s=20, elapsed_s=15, total_s=60) == 45  # 105 carried, 45 to the deadline


def test_a_stage_left_under_the_floor_is_not_run_unless_its_own_budget_is_smaller_still():
    assert MIN_STAGE_S == 10
    assert stage_budget(90, planned_s=400, elapsed_s=471, total_s=480) is None  # 9 s left
    assert stage_budget(90, planned_s=400, elapsed_s=470, total_s=480) == 10  # exactly the floor
    assert stage_budget(3, planned_s=0, elapsed_s=0, total_s=480) == 3  # --budget STAGE=3 asks for 3 s
    assert stage_budget(3, planned_s=0, elapsed_s=478, total_s=480) is None  # 2 s left of the 3 asked for


@without_cuda
def test_a_stage_left_too_little_of_the_total_budget_is_reported_not_run_out_of_time(tmp_path):
    # The environment stage hangs and is killed at its 3 s (>= 3 s gone), so at most 9 s of the 12 s are left
    # for the build stage: under the 10 s floor.
    proc, report = gpu_check(tmp_path, "--stages", "environment,build", "--inject-fault", "environment=hang",
                             "--budget", "environment=3", "--total-budget", "12")  # fmt: skip
    stages = by_name(report)
    assert report["total_budget_s"] == 12
    assert stages["environment"]["status"] == "failed" and stages["environment"]["budget_s"] == 3
    build = stages["build"]
    assert build["status"] == "not run" and build["reason"].startswith("out of time: ")
    assert build["reason"].endswith(" s left of the 12 s total budget (--total-budget)")
    assert build["budget_s"] < MIN_STAGE_S and build["own_budget_s"] == 30
    assert "build: not run: out of time" in proc.stdout


def test_a_killed_pytest_still_reports_the_tests_it_finished():
    """The lines `pytest -v` prints as each test ends; the summary's FAILED line and a cut-off last line
    (the kill came mid-test) are not tests."""
    output = "\n".join([
        "tests/kernels/test_a.py::test_one PASSED                                  [ 10%]",
        "tests/kernels/test_a.py::test_two[cuda-N1-V1-torch.float32] FAILED        [ 20%]",
        "tests/kernels/test_a.py::test_three SKIPPED (needs a CUDA device)         [ 30%]",
        "tests/kernels/test_a.py::test_four PASSED                                 [ 40%]",
        "tests/kernels/test_a.py::test_four ERROR                                  [ 40%]",
        "FAILED tests/kernels/test_a.py::test_two[cuda-N1-V1-torch.float32] - AssertionError",
        "tests/kernels/test_a.py::test_five ",
    ])  # fmt: skip
    failed = ["tests/kernels/test_a.py::test_two[cuda-N1-V1-torch.float32]", "tests/kernels/test_a.py::test_four"]
    assert counts_from_verbose_output(output) == dict(passed=1, failed=2, skipped=1, failed_tests=failed)


def test_a_slow_cuda_call_is_timed_at_least_five_times():
    assert MIN_TIMED_CALLS == 5
    assert repetition_ms(once_ms=2.0, rep_ms=200) == 200  # fast calls: do_bench's usual 200 ms (~100 calls)
    # A 300 ms call: 200 ms would time it once; 1.5 * 5 * 300 ms times it at least 5 times whatever do_bench's
    # own estimate adds (an L2 flush per call) and its truncation of rep / estimate.
    assert repetition_ms(once_ms=300.0, rep_ms=200) == 2250
    assert int(repetition_ms(once_ms=300.0, rep_ms=200) / (300.0 * 1.4)) >= MIN_TIMED_CALLS


def test_per_file_outcomes_come_from_the_junit_report_or_from_a_killed_pytests_lines(tmp_path):
    files = ["tests/kernels/test_a.py", "tests/kernels/test_b.py"]
    junit = tmp_path / "report.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.kernels.test_a" name="test_one" time="1.5" />'
        '<testcase classname="tests.kernels.test_a.TestGroup" name="test_two" time="0.5"><failure message="x"/>'
        "</testcase>"
        '<testcase classname="tests.kernels.test_b" name="test_three" time="2.0"><skipped message="no CUDA"/>'
        "</testcase>"
        '<testcase classname="" name="tests.kernels.test_c" time="0.0"><error message="collection"/></testcase>'
        "</testsuite></testsuites>"
    )  # fmt: skip
    grouped, seconds = outcomes_by_file(files, killed=False, output="", junit=junit)
    assert grouped == {
        "tests/kernels/test_a.py": {"tests/kernels/test_a.py::test_one": "passed",
                                    "tests/kernels/test_a.py::test_two": "failed"},
        "tests/kernels/test_b.py": {"tests/kernels/test_b.py::test_three": "skipped"},
        None: {"::tests.kernels.test_c": "failed"},
    }  # fmt: skip
    assert seconds == {"tests/kernels/test_a.py": 2.0, "tests/kernels/test_b.py": 2.0, None: 0.0}
    output = "tests/kernels/test_a.py::test_one PASSED   [ 50%]\ntests/kernels/test_b.py::test_three "
    grouped, seconds = outcomes_by_file(files, killed=True, output=output, junit=tmp_path / "none.xml")
    assert grouped == {"tests/kernels/test_a.py": {"tests/kernels/test_a.py::test_one": "passed"}} and seconds == {}


def test_the_gpu_budgets_sum_to_the_whole_checks_deadline_and_an_unknown_stage_is_named_with_the_choices():
    assert sum(s.budget_s for s in STAGES) == TOTAL_BUDGET_S == 480
    assert [s.name for s in STAGES] == STAGES_IN_ORDER
    with pytest.raises(ValueError, match="unknown stage 'kernels'; the stages are environment, build, correctness"):
        stage_function("kernels")


# ---------------------------------------------------------------- the build stage's pure parts (any machine)


def test_the_wheels_source_export_leaves_out_build_outputs_and_the_runs_own_folder(tmp_path):
    root = tmp_path / "tree"
    kept = ["pyproject.toml", "setup.py", "csrc/cuda/policy_loss.cu", "dler_kernels/__init__.py",
            "trainer/dist/fsdp.py", "tests/kernels/test_cuda_oracles.py", "bench/gpu_check/build.py"]  # fmt: skip
    left_out = ["dler_kernels/_C.cpython-312-x86_64-linux-gnu.so", "dler_kernels/_build_info.py", "build/lib/x.py",
                "dist/cuda/dler-0.1.0+cu130torch2.11-cp312-cp312-linux_x86_64.whl", "runs/demo/summary.json",
                "gpu-check/gpu_report.md", "gpu-check-smoke/gpu_report.md", "dler.egg-info/PKG-INFO",
                "trainer/__pycache__/cli.cpython-312.pyc", ".venv/bin/python", ".venv-verl/bin/python", ".git/HEAD",
                ".pytest_cache/README.md", "out/wheel/src/setup.py"]  # fmt: skip
    for name in kept + left_out:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    files, how = source_files(root, exclude=root / "out", use_git=False)
    assert how == "walk (no git)" and files == sorted(kept)
    exported = export_tree(root, tmp_path / "src", exclude=root / "out", use_git=False)
    assert exported["files"] == len(kept)
    assert sorted(p.relative_to(tmp_path / "src").as_posix() for p in (tmp_path / "src").rglob("*") if p.is_file()) \
        == sorted(kept)  # fmt: skip
    assert (tmp_path / "src" / "setup.py").read_text() == "setup.py"


def test_the_export_of_this_checkout_holds_its_sources_and_no_build_output():
    files, how = source_files(ROOT)  # git's list where there is git, else the walk
    assert {"setup.py", "pyproject.toml", "csrc/cuda/policy_loss.cu", "bench/gpu_check/build.py"} <= set(files), how
    assert not [f for f in files if f.endswith(".so") or f.startswith(("build/", "dist/", ".venv"))
                or f == "dler_kernels/_build_info.py" or "__pycache__" in f]  # fmt: skip


# The build log's ptxas -v lines as pip -v shows them (indented), one kernel per arch, the sm_90 one spilling.
PTXAS_LOG = """\
  [6/6] /usr/local/cuda/bin/nvcc -c policy_loss.cu -gencode=arch=compute_100,code=compute_100 ...
  ptxas info    : 200 bytes gmem
  ptxas info    : Compiling entry function '_ZN4dler11slab_kernelIffLi1EEEvNS_8SlabArgsIT_T0_EE' for 'sm_100'
  ptxas info    : Function properties for _ZN4dler11slab_kernelIffLi1EEEvNS_8SlabArgsIT_T0_EE
      0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Used 28 registers, used 0 barriers
  ptxas info    : Compiling entry function '_ZN4dler11slab_kernelIffLi1EEEvNS_8SlabArgsIT_T0_EE' for 'sm_80'
  ptxas info    : Function properties for _ZN4dler11slab_kernelIffLi1EEEvNS_8SlabArgsIT_T0_EE
      0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Compiling entry function '_ZN4dler11slab_kernelIffLi1EEEvNS_8SlabArgsIT_T0_EE' for 'sm_90'
  ptxas info    : Function properties for _ZN4dler11slab_kernelIffLi1EEEvNS_8SlabArgsIT_T0_EE
      16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
  ptxas info    : Used 255 registers, used 0 barriers
"""


def test_the_ptxas_report_counts_each_archs_kernels_and_names_a_spilling_one():
    assert WHEEL_ARCH_LIST == "8.0;9.0;10.0+PTX" and wheel_archs() == ["sm_80", "sm_90", "sm_100"]
    reports = ptxas_report(PTXAS_LOG)
    spill = "_ZN4dler11slab_kernelIffLi1EEEvNS_8SlabArgsIT_T0_EE: 12 bytes spill stores, 8 bytes spill loads"
    assert reports == {"sm_100": dict(kernels=1, spilling=[]), "sm_80": dict(kernels=1, spilling=[]),
                       "sm_90": dict(kernels=1, spilling=[spill])}  # fmt: skip
    assert ptxas_problems(reports, wheel_archs()) == [f"sm_90: {spill}"]
    clean = PTXAS_LOG.replace("12 bytes spill stores, 8 bytes spill loads", "0 bytes spill stores, 0 bytes spill loads")
    assert ptxas_problems(ptxas_report(clean), wheel_archs()) == []
    # A log without -Xptxas=-v (or without an arch) is not a clean report.
    without_sm80 = ptxas_report(clean.replace("'sm_80'", "'sm_90'"))
    assert ptxas_problems(without_sm80, wheel_archs()) == [
        "no ptxas report for sm_80 (built without -Xptxas=-v, or not for sm_80)",
        "the archs compiled different numbers of kernels: {'sm_100': 1, 'sm_90': 2}",
    ]


def test_the_local_tag_is_read_from_the_wheels_name_and_names_the_cuda_and_torch_of_the_build():
    assert local_tag("dler-0.1.0+cu130torch2.11-cp312-cp312-linux_x86_64.whl") == "cu130torch2.11"
    assert local_tag("dler-0.1.0+cputorch2.13-cp311-cp311-linux_x86_64.whl") == "cputorch2.13"
    assert local_tag("dler-0.1.0-py3-none-any.whl") is None
    assert expected_local_tag("2.11.0+cu130", "13.0") == "cu130torch2.11"
    assert expected_local_tag("2.13.0+cpu", None) == "cputorch2.13"
