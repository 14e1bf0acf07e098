"""pytest as a part of a stage, and its outcomes read back: from its junit report, or, when pytest was killed at
its time limit (no report written), from the lines ``pytest -v`` printed as each test ended."""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .context import StageContext
from .runner import ROOT, run_command, tail


def pytest_counts(junit: Path) -> dict:
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(passed=passed, failed=counts["failures"] + counts["errors"], skipped=counts["skipped"],
                failed_tests=failed[:30])  # fmt: skip


# A test's outcome as ``pytest -v`` prints it while it runs: what a killed pytest leaves of its counts.
VERBOSE_OUTCOME = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)
OUTCOMES = dict(PASSED="passed", XFAIL="passed", XPASS="passed", FAILED="failed", ERROR="failed", SKIPPED="skipped")


def verbose_outcomes(output: str) -> dict[str, str]:
    """{test id: passed / failed / skipped} from ``pytest -v`` output, each test's line as it finished (a test
    that errors in teardown prints a second line: the last one counts)."""
    return {node: OUTCOMES[outcome] for node, outcome in VERBOSE_OUTCOME.findall(output)}


def junit_outcomes(junit: Path) -> list[tuple[str, str, str, float]]:
    """(classname, name, passed / failed / skipped, seconds) of every test case of a junit report."""
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        cases.append((case.get("classname", ""), case.get("name", ""), outcome, float(case.get("time", 0.0))))
    return cases


def tally(outcomes: dict[str, str]) -> dict:
    """Passed / failed / skipped counts (and the first failed tests) of {test id: outcome}."""
    failed = [node for node, outcome in outcomes.items() if outcome == "failed"]
    passed = sum(outcome == "passed" for outcome in outcomes.values())
    skipped = sum(outcome == "skipped" for outcome in outcomes.values())
    return dict(passed=passed, failed=len(failed), skipped=skipped, failed_tests=failed[:30])


def counts_from_verbose_output(output: str) -> dict:
    """The counts a killed pytest leaves in its ``-v`` output."""
    return tally(verbose_outcomes(output))


def outcomes_by_file(files: list[str], killed: bool, output: str, junit: Path) -> tuple[dict, dict]:
    """({file: {test id: outcome}}, {file: seconds}) from the junit report, or from the ``-v`` lines of a killed
    pytest (which wrote none, nor any time); the key None collects what belongs to no file of ``files`` (a
    collection error, say)."""
    grouped: dict[str | None, dict[str, str]] = {}
    seconds: dict[str | None, float] = {}
    if killed:
        for node, outcome in verbose_outcomes(output).items():
            path = node.split("::")[0]
            grouped.setdefault(path if path in files else None, {})[node] = outcome
        return grouped, seconds
    modules = {f.removesuffix(".py").replace("/", "."): f for f in files}
    for classname, name, outcome, took in junit_outcomes(junit):
        path = next((f for m, f in modules.items() if classname == m or classname.startswith(m + ".")), None)
        grouped.setdefault(path, {})[f"{path or classname}::{name}"] = outcome
        seconds[path] = seconds.get(path, 0.0) + took
    return grouped, seconds


def run_pytest(
    ctx: StageContext,
    label: str,
    selection: list[str],
    env: dict,
    timeout: float,
    why_skipped: str = "",
    *,
    python: str | Path = sys.executable,
    log: Path | None = None,
) -> None:
    """``python -m pytest SELECTION`` in ROOT, killed at ``timeout``: one part named ``label`` with its counts
    (passed, or failed / skipped with the reason); ``log``: where its output goes (else it is only kept in the
    part's error, the tail of it)."""
    junit = ctx.out / "logs" / f"pytest-{re.sub(r'[^A-Za-z0-9_.-]+', '-', label).strip('-')}.xml"
    junit.unlink(missing_ok=True)
    cmd = [str(python), "-m", "pytest", *selection, "-v", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    done = run_command(cmd, timeout, env=env, cwd=ROOT, log=log)
    shown = "pytest" if str(python) == sys.executable else f"{python} -m pytest"
    if done.returncode is None:
        partial = counts_from_verbose_output(done.output)
        ctx.part(label, "failed", f"timed out after {timeout:.0f} s (counts: the tests done by then)",
                 command=" ".join(cmd[1:]), seconds=round(done.seconds, 1), **partial,
                 error=tail(done.output))  # fmt: skip
        return
    if not junit.exists():
        ctx.part(label, "failed", f"pytest exited {done.returncode} with no report", error=tail(done.output))
        return
    counts = pytest_counts(junit)
    if counts["failed"]:
        status, reason = "failed", f"{counts['failed']} failed"
    elif done.returncode not in (0, 5):  # 5: nothing selected, which the counts report as all skipped
        status, reason = "failed", f"pytest exited with status {done.returncode}"
    elif counts["passed"] == 0:
        status, reason = "skipped", f"all {counts['skipped']} selected tests skipped{why_skipped}"
    else:
        status, reason = "passed", ""
    ctx.part(label, status, reason, command=f"{shown} " + " ".join(selection), seconds=round(done.seconds, 1),
             **counts, error=tail(done.output) if status == "failed" else "")  # fmt: skip
