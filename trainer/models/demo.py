"""The CPU demo's policy: a tiny model warm-started to reason verbosely on toy arithmetic.

DLER shortens reasoning that is longer than it needs to be. To show that on a 2-core machine in
minutes, the demo needs a policy that (a) solves its task and (b) wastes tokens doing so, the way
R1-distilled models re-verify answers they already have. :func:`trainer.models.warm_start.warm_start` builds one:

* a character-level tokenizer (86 tokens: digits, letters, punctuation, ``<think>``, ``</think>``,
  ``\\boxed{``), so the model is ~1M parameters and not a 49152-wide output head;
* a tiny Llama (4 layers, hidden 128) trained by supervised fine-tuning on *verbose chains* of
  ``toy-arith`` problems: worked steps (ones and tens with carries and borrows), the result, then a
  uniformly random number (0 to ``max_checks``) of redundant re-checks, then the boxed answer.

The re-checks never change the answer: a policy that learns to skip them keeps its accuracy at a
fraction of the length, which is exactly what the DLER run must find. This module is the task and the
model's shape (:class:`WarmStartConfig`); :mod:`trainer.models.warm_start` runs the supervised stage.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from dataclasses import asdict, dataclass

from ..data import Example

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


def build_model(cfg: WarmStartConfig, tokenizer):
    """The untrained demo Llama of ``cfg``'s shape, its weights drawn from ``cfg.seed``."""
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


__all__ = ["WarmStartConfig", "build_model", "char_tokenizer", "sft_pairs", "verbose_chain", "worked_steps"]
