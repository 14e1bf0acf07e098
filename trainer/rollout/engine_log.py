"""Where a rollout engine's own output goes: a log file (``engine.log`` in the run or eval folder), with
only the engine's errors on the console.

Colocated with the trainer, vLLM would print three lines per step (weight reload, prefix-cache reset,
CPU thread notes) and dozens while it starts (its config, C++ warnings, a checkpoint-loading bar),
burying the trainer's table. Two channels carry that output, and both are routed:

* vLLM's loggers (``vllm`` and its children), configured by the ``dictConfig`` of
  :func:`vllm_logging_config`: every record into the file, ERROR and above also to stderr with a
  pointer to the file. vLLM applies a logging config on every ``vllm.LLM(...)`` and again at the start
  of each engine process it spawns (``VLLM_ENABLE_V1_MULTIPROCESSING=1``), from the ``LoggingConfig``
  in its engine config; the config therefore travels as a file named there, not as handlers set here.
* Everything written straight to the process's stdout and stderr while the engine starts (C++
  warnings, tqdm bars, Python warnings, records logged before vLLM's logger has a handler):
  :func:`output_to` points file descriptors 1 and 2 at the log for that span. An engine process spawned
  then inherits those descriptors, so its raw output lands in the log for its whole life.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENGINE_LOG = "engine.log"


def vllm_logging_config(log_file: Path) -> dict:
    """A ``logging.config.dictConfig`` for the ``vllm`` logger: all records (from ``VLLM_LOGGING_LEVEL``,
    default INFO) to ``log_file``, ERROR and above also to stderr."""
    level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper()
    pointer = str(log_file).replace("%", "%%")  # a literal in the format string
    return {
        "version": 1,
        "disable_existing_loggers": False,  # the trainer's and transformers' loggers stay as they are
        "formatters": {
            "file": {"format": "%(asctime)s pid %(process)d %(levelname)s [%(name)s] %(message)s"},
            "console": {"format": f"vllm %(levelname)s: %(message)s (engine log: {pointer})"},
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(log_file),
                "mode": "a",
                "encoding": "utf-8",
                "formatter": "file",
            },
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "level": "ERROR",
                "formatter": "console",
            },
        },
        "loggers": {"vllm": {"handlers": ["file", "console"], "level": level, "propagate": False}},
    }


class VLLMLogging:
    """vLLM's logging into ``log_file`` for one engine: applied in this process at once (vLLM logs while
    it is imported, before it applies any config), and handed to ``vllm.LLM`` by :meth:`engine_args` as
    the ``LoggingConfig`` that vLLM re-applies in each of its processes. That config names a JSON file,
    read only while the engine starts (by ``vllm.LLM`` and by each process it spawns then): :meth:`close`
    removes it once ``vllm.LLM(...)`` has returned or failed."""

    def __init__(self, log_file: Path):
        import logging.config

        self.log_file = Path(log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.config = vllm_logging_config(self.log_file)
        logging.config.dictConfig(self.config)
        self.config_file: Path | None = None

    def engine_args(self) -> dict:
        """The ``vllm.LLM`` keyword that makes vLLM apply this config (in-process and in its engine processes)."""
        from vllm.config.logging import LoggingConfig

        if self.config_file is None:
            fd, name = tempfile.mkstemp(prefix="dler-vllm-logging-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(self.config, f)
            self.config_file = Path(name)
        return {"logging_config": LoggingConfig(configure_logging=True, pylogging_config_file=str(self.config_file))}

    def close(self) -> None:
        if self.config_file is not None:
            self.config_file.unlink(missing_ok=True)
            self.config_file = None


@contextmanager
def output_to(log_file: Path | str | None) -> Iterator[None]:
    """File descriptors 1 and 2 (and so ``sys.stdout``/``sys.stderr``, C++ and child-process output)
    appended to ``log_file`` inside the block. An exception leaving the block gets a note naming the log.
    None leaves the output where it goes (an engine made without a log file)."""
    if log_file is None:
        yield
        return
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _flush_std_streams()
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    except BaseException as e:
        e.add_note(f"the engine's log: {log_file}")
        raise
    finally:
        _flush_std_streams()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):  # replaced by an object without flush, or closed
            pass


def last_lines(log_file: Path, count: int = 20) -> str:
    """The end of a log, for an error message when the folder holding the log is about to be removed."""
    try:
        lines = Path(log_file).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(lines[-count:])
