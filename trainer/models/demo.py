"""The CPU demo's policy: a tiny model warm-started to reason verbosely on toy arithmetic.

DLER shortens reasoning that is longer than it needs to be. To show that on a 2-core machine in
minutes, the demo needs a policy that (a) solves its task and (b) wastes tokens doing so, the way
R1-distilled models re-verify answers they already have. :func:`warm_start` builds one:

* a character-level tokenizer (86 tokens: digits, letters, punctuation, ``<think>``, ``</think>``,
  ``\\boxed{``), so the model is ~1M parameters and not a 49152-wide output head;
* a tiny Llama (4 layers, hidden 128) trained by supervised fine-tuning on *verbose chains* of
  ``toy-arith`` problems: worked steps (ones and tens with carries and borrows), the result, then a
  uniformly random number (0 to ``max_checks``) of redundant re-checks, then the boxed answer.

The re-checks never change the answer: a policy that learns to skip them keeps its accuracy at a
fraction of the length, which is exactly what the DLER run must find. The result is an ordinary
Hugging Face folder (transformers and vLLM load it), cached under ``$DLER_CACHE`` (default
``~/.cache/dler``) keyed by the settings, and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import Example, toy_arith
from ..fsutil import UserError, atomic_directory, is_complete
from ..model_files.hf_folder import cache_dir, save_state_dict

EOS = "<|endoftext|>"
WORD_TOKENS = ("<think>", "</think>", "\\boxed{", "Check", "Yes", "carry", "borrow", "Ones", "Tens", "What is")
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
_QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
# The warm start's questions come from toy-arith with this offset on its seed, so they are not the questions
# an RL run draws with a small data.seed: the demo's RL prompts are not ones the SFT stage memorised.
SFT_DATA_SEED_OFFSET = 10_000
# Context of the demo model: well above its longest sequence (a question and 12 re-checks are a few
# hundred characters, one token each).
MAX_POSITIONS = 1024
# The SFT stage's optimizer: AdamW's usual weight decay and gradient-norm clip; warmup over the first
# 1/WARMUP_DIVISOR of the batches, then a cosine down to MIN_LR_SHARE of the learning rate (not 0, so the
# last batches still learn). The recorded final loss is the mean over the last FINAL_LOSS_BATCHES (one
# batch's loss is noisy).
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
WARMUP_DIVISOR = 20
MIN_LR_SHARE = 0.05
FINAL_LOSS_BATCHES = 20
IGNORE_INDEX = -100  # cross_entropy's default ignore_index: prompt and padding positions carry no loss


def char_tokenizer():
    """A tokenizer with one token per character plus a few whole words, loadable by transformers and vLLM.

    Words are matched before the per-character split (tokenizers' added tokens), so "Check" is one
    token; decoding concatenates tokens (``Fuse``), so any text round-trips exactly. The chat template
    is the bare question and a newline: the demo has one turn and no system prompt.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.digits + string.ascii_letters + " \n+-*/=.,:;?!{}()[]\\<>_'\""))
    vocab = {token: i for i, token in enumerate([EOS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_tokens(list(WORD_TOKENS))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _parse(question: str) -> tuple[int, str, int]:
    match = _QUESTION.fullmatch(question)
    if match is None:
        raise ValueError(
            f"verbose chains cover 'What is A + B?' and 'What is A - B?' (difficulty 1-2); got {question!r}"
        )
    a, op, b = match.groups()
    return int(a), op, int(b)


def worked_steps(question: str) -> tuple[str, int]:
    """The column method for ``a + b`` / ``a - b`` as lines of text, and the result."""
    a, op, b = _parse(question)
    result = a + b if op == "+" else a - b
    if a < 10 and b < 10:
        return f"{a} {op} {b} = {result}.\n", result
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        ones = a0 + b0
        carry = ones // 10
        lines = f"Ones: {a0} + {b0} = {ones}" + (f", carry {carry}.\n" if carry else ".\n")
        lines += f"Tens: {a1} + {b1} + {carry} = {a1 + b1 + carry}.\n"
    else:
        borrow = int(a0 < b0)
        lines = (
            f"Ones: {a0} - {b0}, borrow: {a0 + 10} - {b0} = {a0 + 10 - b0}.\n"
            if borrow
            else f"Ones: {a0} - {b0} = {a0 - b0}.\n"
        )
        lines += f"Tens: {a1} - {b1} - {borrow} = {a1 - b1 - borrow}.\n"
    return lines + f"{a} {op} {b} = {result}.\n", result


def verbose_chain(question: str, checks: int) -> str:
    """The response the warm start teaches: worked steps, ``checks`` redundant re-checks, the boxed answer."""
    steps, result = worked_steps(question)
    a, op, b = _parse(question)
    recheck = f"Check: {a} {op} {b} = {result}. Yes.\n"
    return f"<think>\n{steps}{recheck * checks}</think>\n\\boxed{{{result}}}"


@dataclass(frozen=True)
class WarmStartConfig:
    """The demo policy: model shape and the supervised stage. Changing any field builds a new cache entry."""

    difficulty: str = "1"
    examples: int = 16000
    max_checks: int = 12
    epochs: int = 1
    lr: float = 5e-3
    batch_sequences: int = 16
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def sft_pairs(examples: list[Example], max_checks: int, seed: int) -> list[tuple[str, str]]:
    """(question, verbose chain) with a uniform number of re-checks in [0, max_checks]."""
    rng = random.Random(seed)
    return [(ex.question, verbose_chain(ex.question, rng.randint(0, max_checks))) for ex in examples]


def _build_model(cfg: WarmStartConfig, tokenizer):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(cfg.seed)
    return transformers.LlamaForCausalLM(config)


def _padded(rows, device):
    """[B, L] right-padded ids, attention mask, and targets (IGNORE_INDEX outside the responses).

    Padding, not packing: on a CPU, SDPA over a packed row builds a T x T block-diagonal mask, so
    attention costs (sum of lengths)^2 instead of sum(length^2) -- 30x more for 32 sequences."""
    import torch

    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        seq = r.prompt_ids + r.response_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        # position t predicts token t + 1: the response starts at len(prompt)
        targets[i, len(r.prompt_ids) - 1 : len(seq) - 1] = torch.tensor(r.response_ids)
    return ids.to(device), mask.to(device), targets.to(device)


def _sft(model, rows, cfg: WarmStartConfig, progress: bool) -> list[float]:
    """Next-token cross-entropy on the response tokens, AdamW with warmup and cosine decay."""
    import torch
    import torch.nn.functional as F

    from ..progress import progress as progress_bar

    rng = random.Random(cfg.seed)
    order = [i for _ in range(cfg.epochs) for i in rng.sample(range(len(rows)), len(rows))]
    batches = [order[i : i + cfg.batch_sequences] for i in range(0, len(order), cfg.batch_sequences)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    warmup = max(1, len(batches) // WARMUP_DIVISOR)

    def lr_at(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        cosine = 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, len(batches) - warmup)))
        return MIN_LR_SHARE + (1 - MIN_LR_SHARE) * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    bar = progress_bar(batches, desc="warm start (SFT)", unit="batch", enabled=progress, leave=False)
    for batch in bar:
        ids, mask, targets = _padded([rows[i] for i in batch], torch.device("cpu"))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def warm_start(cfg: WarmStartConfig = WarmStartConfig(), out: Path | None = None, *, progress: bool = True) -> Path:
    """The warm-started demo policy as a HF folder (built once, then reused from the cache)."""
    import torch

    from ..update.packing import UpdateRow

    out = Path(out).expanduser() if out is not None else cache_dir() / f"demo-verbose-arith-{cfg.key()}"
    if is_complete(out):
        return out
    start = time.perf_counter()
    tokenizer = char_tokenizer()
    try:
        examples = toy_arith(size=cfg.examples, difficulty=cfg.difficulty, seed=SFT_DATA_SEED_OFFSET + cfg.seed)
        pairs = sft_pairs(examples, cfg.max_checks, cfg.seed)
    except ValueError as e:
        raise UserError(f"demo warm start: {e}") from None
    prompts = tokenizer.apply_chat_template(
        [[{"role": "user", "content": q}] for q, _ in pairs], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    rows = [UpdateRow(list(p), list(r) + [tokenizer.eos_token_id], 0.0) for p, r in zip(prompt_ids, response_ids)]
    model = _build_model(cfg, tokenizer)
    with atomic_directory(out, overwrite=True) as tmp:
        losses = _sft(model, rows, cfg, progress)
        save_state_dict(model, tmp, torch.float32)  # the tied head is stored once, as the embedding
        model.config.dtype = "float32"
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = dict(
            warm_start=asdict(cfg),
            sft_sequences=len(rows) * cfg.epochs,
            sft_tokens=sum(r.tokens for r in rows) * cfg.epochs,
            first_loss=losses[0],
            final_loss=sum(losses[-FINAL_LOSS_BATCHES:]) / len(losses[-FINAL_LOSS_BATCHES:]),
            seconds=round(time.perf_counter() - start, 1),
        )
        (tmp / "dler_warm_start.json").write_text(json.dumps(record, indent=1))
    return out


__all__ = ["WarmStartConfig", "char_tokenizer", "sft_pairs", "verbose_chain", "warm_start", "worked_steps"]
