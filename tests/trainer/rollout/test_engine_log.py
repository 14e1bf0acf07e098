"""trainer.rollout.engine_log: vLLM's records into the log file (errors also on stderr), start-up output captured
at the file-descriptor level, and vLLM's false alarm about the rotary cache dropped (trainer.rollout.vllm_engine)."""

import logging
import os
import subprocess
import sys

import pytest

from trainer.rollout.engine_log import last_lines, output_to, vllm_logging_config
from trainer.rollout.vllm_engine import RotaryCacheReloadWarning


@pytest.fixture
def vllm_logger():
    """The ``vllm`` logger as a test left it, restored afterwards (its handlers closed)."""
    logger = logging.getLogger("vllm")
    before = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:], logger.level, logger.propagate = before


def test_vllm_records_go_to_the_log_file_and_only_errors_also_to_stderr(tmp_path, vllm_logger, capsys, monkeypatch):
    import logging.config

    # The default level (INFO); importing trl sets VLLM_LOGGING_LEVEL=ERROR for the whole process.
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    log = tmp_path / "run" / "engine.log"
    log.parent.mkdir()
    logging.config.dictConfig(vllm_logging_config(log))
    child = logging.getLogger("vllm.model_executor.some_layer")
    child.info("Reloading weights inplace...")
    child.warning("libtcmalloc is not found in LD_PRELOAD")
    child.error("the engine died")
    text = log.read_text()
    assert "INFO [vllm.model_executor.some_layer] Reloading weights inplace..." in text
    assert "WARNING" in text and "the engine died" in text
    assert capsys.readouterr().err.splitlines() == [f"vllm ERROR: the engine died (engine log: {log})"]


def test_output_to_takes_what_is_written_to_the_descriptors_and_gives_them_back(tmp_path):
    # A child process, so that pytest's own capture of file descriptors 1 and 2 is not in the way.
    log = tmp_path / "engine.log"
    code = (
        "import os, sys\n"
        "from trainer.rollout.engine_log import output_to\n"
        "print('before')\n"
        f"with output_to({str(log)!r}):\n"
        "    print('python stdout'); print('python stderr', file=sys.stderr)\n"
        "    os.write(2, b'C++ warning\\n')\n"
        "    os.system('echo from a child process')\n"
        "print('after')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (out.stdout, out.stderr) == ("before\nafter\n", "")
    assert log.read_text().splitlines() == ["python stdout", "python stderr", "C++ warning", "from a child process"]


def test_an_error_while_the_engine_starts_names_the_log_and_its_last_lines_survive(tmp_path):
    log = tmp_path / "engine.log"
    with pytest.raises(RuntimeError) as e:
        with output_to(log):
            os.write(2, b"".join(b"line %d\n" % i for i in range(30)))
            raise RuntimeError("vLLM failed to start")
    assert f"the engine's log: {log}" in e.value.__notes__
    assert last_lines(log, 3) == "line 27\nline 28\nline 29"
    assert last_lines(tmp_path / "missing.log") == ""


def _reload_record(layer: str) -> logging.LogRecord:
    name = RotaryCacheReloadWarning.LOGGER
    return logging.LogRecord(name, logging.WARNING, "layerwise.py", 266, "%s: Failed to load weights", (layer,), None)


def test_the_rotary_cache_reload_warning_is_dropped_and_the_same_warning_for_a_real_layer_passes():
    keep = RotaryCacheReloadWarning().filter
    assert not keep(_reload_record("RotaryEmbedding"))
    assert not keep(_reload_record("Llama3RotaryEmbedding"))
    assert keep(_reload_record("QKVParallelLinear"))
    other = logging.LogRecord(RotaryCacheReloadWarning.LOGGER, logging.WARNING, "x.py", 1, "RotaryEmbedding", (), None)
    assert keep(other)
