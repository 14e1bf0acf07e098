"""The transformers rollout engine (:class:`HFEngine`): ``generate`` of a transformers model, for machines
without vLLM and as the tests' oracle. It follows ``trainer.rollout.contract.RolloutEngine``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ..chunking import nbytes
from .contract import CheckpointLayout, NamedTensors, Prompt, Sample, WeightSyncStats, check_sampling, check_sleep_tags
from .engine_log import output_to


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
        with output_to(log_file):
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

        check_sampling(n, max_tokens, temperature, top_p)
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
        check_sleep_tags(tags)  # the same contract as vLLM's engine: unknown tags are an error everywhere

    def close(self) -> None:
        """Drop the model (its memory returns once nothing else holds it)."""
        self.model = None
