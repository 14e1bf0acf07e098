import subprocess
import sys
from pathlib import Path

from trainer.cli import main


def _dler_script() -> Path:
    script = Path(sys.executable).parent / "dler"
    assert script.is_file(), f"console script {script} is not installed"
    return script


def test_console_script_help_lists_subcommands():
    out = subprocess.run([str(_dler_script()), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("prepare-model", "generate", "train", "eval", "merge", "drqa-data"):
        assert command in out.stdout


def test_module_entry_point_matches_console_script():
    out = subprocess.run([sys.executable, "-m", "trainer", "prepare-model", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "smollm2" in out.stdout and "tiny-llama" in out.stdout and "--out" in out.stdout


def test_missing_subcommand_is_a_usage_error(capsys):
    try:
        main([])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("dler without a subcommand must exit with a usage error")
    assert "COMMAND" in capsys.readouterr().err


def test_unknown_model_alias_is_one_line_error(capsys, tmp_path):
    rc = main(["generate", "--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "neither an alias" in err
