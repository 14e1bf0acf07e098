"""A rollout engine in its own process (:class:`EngineProcess`): the engine of the asynchronous loop
(``rollout.async_staleness`` >= 1), which samples while the trainer updates.

The child process builds the engine the trainer names (``make_engine(kind, ...)``: vLLM in its own
in-process mode there, or transformers) and serves the :class:`~trainer.rollout.contract.RolloutEngine`
calls sent over a pipe, one at a time. Weights travel as CPU tensors that ``torch.multiprocessing``'s
pickling moves to shared memory, so a weight update copies each tensor once, into the engine. The child
sees none of ``torchrun``'s variables: each rank's engine is a single-process engine of its own, on the
devices ``devices`` names (``CUDA_VISIBLE_DEVICES``), or on the CPU.

**No wait without a bound.** Every reply is awaited at most ``timeout_s`` seconds, checking each second
that the child lives: an engine that died (killed, out of memory, a crash in native code) is one
:class:`EngineDied` naming its exit code and its log, never a hang; one that does not answer in time is
an :class:`EngineTimeout`. An error raised inside the child comes back as the same class where it is a
built-in or :class:`~trainer.fsutil.UserError`, else as a RuntimeError carrying the child's traceback.
Everything the child prints goes to ``log_file`` (the run folder's ``engine.log``).
"""

from __future__ import annotations

import builtins
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fsutil import UserError
from .contract import NamedTensors, Prompt, Sample, WeightSyncStats

# torchrun's variables: the child's engine must not take itself for a rank of the trainer's job (vLLM
# would join it with its external launcher).
LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
)  # fmt: skip
START_TIMEOUT_S = 600.0  # building an engine: vLLM's import, model load and warm-up take minutes on a large model
LIVENESS_POLL_S = 1.0  # how often a wait checks that the child still lives
CLOSE_WAIT_S = 10.0  # closing: how long the engine may take to finish another thread's call, then to shut down


class EngineDied(UserError):
    """The engine process ended while the trainer waited on it."""


class EngineTimeout(UserError):
    """The engine process did not answer within its timeout."""


class EngineProcess:
    """The ``RolloutEngine`` protocol, served by an engine in a child process (see the module's docstring).

    ``threads``: the child's torch threads (None: torch's default), to split the cores between engine and
    trainer. Thread-safe: one call at a time reaches the child."""

    def __init__(
        self,
        kind: str,
        model_dir: Path | str,
        *,
        log_file: Path | str,
        timeout_s: float,
        devices: str | None = None,
        threads: int | None = None,
        **options: Any,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.log_file, self.timeout_s = Path(log_file), float(timeout_s)
        self._lock = threading.Lock()
        ctx = multiprocessing.get_context("spawn")  # fork would copy the trainer's threads and process groups
        self._conn, child = ctx.Pipe()
        setup = dict(devices=devices, threads=threads, log_file=str(log_file))
        self._proc = ctx.Process(
            target=serve, args=(child, kind, str(model_dir), options, setup), name="dler-engine", daemon=True
        )
        self._proc.start()
        child.close()
        try:
            self.info = self._call("info", timeout_s=max(self.timeout_s, START_TIMEOUT_S))
        except BaseException:
            self._kill()
            raise
        self.device_name = self.info["device_name"]

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def can_sleep(self) -> bool:
        return False  # it has its own devices: nothing to hand to the update

    def sleep(self) -> None:
        pass

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        pass

    def generate(self, prompts: Sequence[Prompt], **sampling: Any) -> list[list[Sample]]:
        return self._call("generate", [p if isinstance(p, str) else list(p) for p in prompts], **sampling)

    def update_weights(self, named_tensors: NamedTensors) -> WeightSyncStats:
        """``named_tensors`` into the engine. CPU tensors go through shared memory; give copies (a snapshot),
        not live parameters, which the pickling would move to shared memory under the optimizer."""
        return self._call("update_weights", list(named_tensors))

    def close(self) -> None:
        """Shut the engine down, then end the process; safe to call twice. An engine busy with another thread's
        call for more than ``CLOSE_WAIT_S`` is killed instead (the call then fails with EngineDied)."""
        if self._lock.acquire(timeout=CLOSE_WAIT_S):
            try:
                if self._proc.is_alive() and not self._conn.closed:
                    self._exchange("close", (), {}, CLOSE_WAIT_S)
            except UserError:
                pass
            finally:
                self._lock.release()
        self._kill()

    def _kill(self) -> None:
        if self._conn.closed:
            return
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        self._conn.close()

    def _call(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        with self._lock:
            return self._exchange(method, args, kwargs, self.timeout_s if timeout_s is None else timeout_s)

    def _exchange(self, method: str, args: tuple, kwargs: dict, limit: float) -> Any:
        """One request and its reply (the caller holds the lock)."""
        if self._conn.closed:
            raise EngineDied(f"the rollout engine process was closed; its log: {self.log_file}")
        try:
            self._conn.send((method, args, kwargs))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise self._died(method) from None
        deadline = time.monotonic() + limit
        while not self._conn.poll(LIVENESS_POLL_S):
            if not self._proc.is_alive() and not self._conn.poll(0):
                raise self._died(method)
            if time.monotonic() > deadline:
                # Its late answer would be taken for the next call's: the engine is done for.
                self._proc.kill()
                self._kill()
                raise EngineTimeout(
                    f"the rollout engine process (pid {self._proc.pid}) did not answer {method} within "
                    f"{limit:g} s (rollout.engine_timeout_s) and was stopped; its log: "
                    f"{self.log_file}"
                )
        try:
            status, value = self._conn.recv()
        except (EOFError, ConnectionResetError):
            raise self._died(method) from None
        if status == "ok":
            return value
        raise _rebuild(value)

    def _died(self, method: str) -> EngineDied:
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        tail = _tail(self.log_file)
        return EngineDied(
            f"the rollout engine process (pid {self._proc.pid}) {how} during {method}; its log: {self.log_file}"
            + (f"\n--- the end of its log ---\n{tail}" if tail else "")
        )


def _tail(log_file: Path, count: int = 10) -> str:
    try:
        return "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-count:])
    except OSError:
        return ""


def _rebuild(error: dict) -> BaseException:
    """The child's exception as the parent raises it: the same class for built-ins and UserError."""
    cls = UserError if error["type"] == "UserError" else getattr(builtins, error["type"], None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(error["message"])
        except TypeError:  # a built-in with another signature
            pass
    return RuntimeError(f"the rollout engine raised {error['type']}: {error['message']}\n{error['traceback']}")


# ------------------------------------------------------------------------------------------ the child


def serve(conn, kind: str, model_dir: str, options: dict, setup: dict) -> None:
    """The child's main: build the engine, then answer calls until ``close`` or the pipe closes."""
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    if setup["devices"] is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = setup["devices"]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # this process is the engine's own already
    log = os.open(setup["log_file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # everything the engine prints goes to the log, as the colocated engine's does
    os.dup2(log, 2)
    engine = None
    try:
        import torch

        if setup["threads"] is not None:
            torch.set_num_threads(setup["threads"])
        from .engines import make_engine

        engine = make_engine(kind, model_dir, log_file=setup["log_file"], **options)
    except BaseException as e:  # noqa: BLE001 (the parent raises it)
        _reply(conn, "error", _describe(e))
        return
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            break
        try:
            if method == "info":
                value = {
                    "device_name": getattr(engine, "device_name", "?"),
                    "pid": os.getpid(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "launcher_variables": [name for name in LAUNCHER_VARIABLES if name in os.environ],
                }
            elif method == "generate":
                value = engine.generate(*args, **kwargs)
            elif method == "update_weights":
                value = engine.update_weights(*args, **kwargs)
            elif method == "close":
                engine.close()
                _reply(conn, "ok", None)
                break
            else:
                raise ValueError(f"unknown engine call {method!r}")
        except BaseException as e:  # noqa: BLE001 (the parent raises it)
            _reply(conn, "error", _describe(e))
            continue
        _reply(conn, "ok", value)
    conn.close()


def _reply(conn, status: str, value: Any) -> None:
    try:
        conn.send((status, value))
    except (BrokenPipeError, OSError):
        pass


def _describe(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
