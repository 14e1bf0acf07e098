"""Building the demo's warm start (the task and the model are :mod:`trainer.models.demo`'s): the supervised stage,
built once per setting, shared between processes, resumable, and whole or absent.

* **Cached** under ``$DLER_CACHE`` (default ``~/.cache/dler``) as ``demo-verbose-arith-KEY``, KEY a hash of the
  :class:`~trainer.models.demo.WarmStartConfig`: an ordinary Hugging Face folder (transformers and vLLM load it)
  that appears whole or not at all (``fsutil.atomic_directory``). The model alias ``demo-verbose-arith`` is seed
  0; ``demo-verbose-arith?seed=N`` is the same recipe from seed N (weights, questions, re-check counts, batch
  order): another warm start, as another machine would build.
* **One builder at a time.** The build holds an exclusive lock on ``.NAME.lock`` beside the folder. Another
  process that wants the same warm start waits for it (up to :data:`LOCK_TIMEOUT_S`, saying who holds it), then
  uses what it built. The lock holder removes the temporaries an earlier killed build left beside the folder.
* **Resumable.** Every :data:`SAVE_EVERY` batches, and when SIGINT or SIGTERM asks it to stop, the build saves
  its state (weights, AdamW and schedule state, batches done, losses) to ``.NAME.partial``; the next build goes on
  from there and ends with the weights an uninterrupted build gives, bit for bit (tested): the batch order is a
  function of the seed, and the model has no dropout. A kill -9 loses the batches since the last save.
* **Reproducible on one machine.** The same config on the same machine gives the same weights bit for bit
  (tested: built twice, compared). Another CPU model gives other weights: torch's CPU kernels take other code
  paths per instruction set (AVX2, AVX-512, AMX), whose floating-point sums run in another order, and 1000 AdamW
  steps carry those last-bit differences into another model. ``dler_warm_start.json`` names the machine.
* **Progress.** A bar on a terminal; elsewhere a line every :data:`HEARTBEAT_S` (batches done, ETA, loss) and
  one when the stage ends.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..data import toy_arith
from ..fsutil import UserError, atomic_directory, exclusive_lock, is_complete
from ..model_files.hf_folder import cache_dir, save_state_dict
from ..signals import CatchStopSignals
from .demo import SFT_DATA_SEED_OFFSET, WarmStartConfig, build_model, char_tokenizer, sft_pairs

ALIAS = "demo-verbose-arith"  # the model alias of the default warm start; ALIAS?seed=N names another seed's
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
# Batches between saves of the partial state: about 30 s of the demo's build (0.29 s a batch on a 2-core EPYC),
# the most a kill -9 loses; a save (weights and AdamW state, 10 MB) takes milliseconds.
SAVE_EVERY = 100
# How long a build waits for another process building the same warm start: the demo's build takes about 5 min
# alone on 2 cores and took 49 min beside a test suite, so an hour covers a live builder; a dead one holds nothing
# (the kernel drops its lock).
LOCK_TIMEOUT_S = 3600.0
HEARTBEAT_S = 30.0  # off a terminal, the build says where it stands this often
RECORD_FILE = "dler_warm_start.json"


def default_folder(cfg: WarmStartConfig) -> Path:
    return cache_dir() / f"{ALIAS}-{cfg.key()}"


def parse_alias(name: str) -> WarmStartConfig | None:
    """The warm start that model name ``name`` asks for (``demo-verbose-arith``, ``demo-verbose-arith?seed=N``),
    or None when it names something else. A malformed ``?...`` is a UserError naming what is accepted."""
    base, question, query = name.partition("?")
    if base != ALIAS:
        return None
    if not question:
        return WarmStartConfig()
    key, eq, value = query.partition("=")
    if key != "seed" or not eq or not value.isdigit():
        raise UserError(f"model {name!r}: the demo's warm start takes {ALIAS} or {ALIAS}?seed=N (N >= 0)")
    return WarmStartConfig(seed=int(value))


class _StopAfterBatch(CatchStopSignals):
    """SIGINT or SIGTERM: stop after the current batch, saving the state; a second SIGINT stops at once (the state
    of the last save stays)."""

    def __init__(self) -> None:
        super().__init__()
        self.signal: str | None = None

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


def warm_start(
    cfg: WarmStartConfig | None = None,
    out: Path | None = None,
    *,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> Path:
    """The warm-started demo policy as a HF folder: from the cache, or built (resuming an interrupted build),
    waiting for another process that builds it. ``progress``: the bar or heartbeat lines and the lines that say
    what the build does (to ``say``, default stderr). A stop (SIGINT, SIGTERM) saves the state and raises
    KeyboardInterrupt. ``cfg``: default the demo's (seed 0)."""
    cfg = cfg if cfg is not None else WarmStartConfig()
    out = Path(out).expanduser().absolute() if out is not None else default_folder(cfg)
    if is_complete(out):
        return out
    if say is None:
        say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the warm start's folder {out.parent}: {e.strerror or e}") from None
    what = f"demo warm start {out.name}"
    with exclusive_lock(out.parent / f".{out.name}.lock", timeout_s=LOCK_TIMEOUT_S, what=what, say=say):
        if is_complete(out):  # the process this one waited for built it
            return out
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a killed build's; no one else writes them now
            shutil.rmtree(stale, ignore_errors=True)
        _build(cfg, out, progress, say)
    return out


def _rows(cfg: WarmStartConfig, tokenizer) -> list:
    from ..update.packing import UpdateRow

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
    return [UpdateRow(list(p), list(r) + [tokenizer.eos_token_id], 0.0) for p, r in zip(prompt_ids, response_ids)]


def _padded(rows):
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
    return ids, mask, targets


class _Sft:
    """Next-token cross-entropy on the response tokens, AdamW with warmup and cosine decay; its state saves and
    loads whole, so a resumed stage continues exactly."""

    def __init__(self, model, rows, cfg: WarmStartConfig):
        import torch

        self.model, self.rows, self.cfg = model, rows, cfg
        rng = random.Random(cfg.seed)
        order = [i for _ in range(cfg.epochs) for i in rng.sample(range(len(rows)), len(rows))]
        self.batches = [order[i : i + cfg.batch_sequences] for i in range(0, len(order), cfg.batch_sequences)]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
        warmup = max(1, len(self.batches) // WARMUP_DIVISOR)
        total = len(self.batches)

        def lr_at(i: int) -> float:
            if i < warmup:
                return (i + 1) / warmup
            cosine = 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))
            return MIN_LR_SHARE + (1 - MIN_LR_SHARE) * cosine

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_at)
        self.done, self.losses = 0, []

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        ids, mask, targets = _padded([self.rows[i] for i in self.batches[self.done]])
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def save(self, path: Path) -> None:
        """The state, written to a temporary and renamed: a kill mid-save leaves the previous save."""
        import torch

        state = {
            "config": asdict(self.cfg), "done": self.done, "losses": self.losses, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
        }  # fmt: skip
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load(self, path: Path) -> str | None:
        """Continue from a saved state; returns why it could not (None when it did, or there was none)."""
        import torch

        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["config"] != asdict(self.cfg):
                return "it was saved by a build of other settings"
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.done, self.losses = int(state["done"]), list(state["losses"])
        except Exception as e:  # unreadable or from another version: start over, it is only a cache
            return f"it could not be read ({type(e).__name__}: {str(e)[:120]})"
        return None


def _build(cfg: WarmStartConfig, out: Path, progress: bool, say: Callable[[str], None]) -> None:
    import torch

    from ..devices import host, host_line
    from ..progress import progress as progress_bar

    start = time.perf_counter()
    tokenizer = char_tokenizer()
    rows = _rows(cfg, tokenizer)
    model = build_model(cfg, tokenizer)
    model.train()
    sft = _Sft(model, rows, cfg)
    partial = out.parent / f".{out.name}.partial"
    refused = sft.load(partial)
    total = len(sft.batches)
    if refused is not None:
        say(f"demo warm start: not resuming from {partial}: {refused}; starting over")
        sft = _Sft(build_model(cfg, tokenizer).train(), rows, cfg)  # fresh: a failed load may have half-loaded
    model = sft.model
    resumed_at = sft.done
    say(
        f"demo warm start: building {out.name} (SFT seed {cfg.seed}, {total} batches"
        + (f", resuming after batch {resumed_at}" if resumed_at else "")
        + "; built once, then cached)"
    )
    with _StopAfterBatch() as stop:
        bar = progress_bar(
            range(resumed_at, total), desc="warm start (SFT)", unit="batch", total=total, initial=resumed_at,
            enabled=progress, leave=False, heartbeat_s=HEARTBEAT_S,
        )  # fmt: skip
        for _ in bar:
            bar.set_postfix(loss=f"{sft.step():.3f}")
            if stop.signal is not None:
                bar.close()
                break
            if sft.done % SAVE_EVERY == 0 and sft.done < total:
                sft.save(partial)
    if stop.signal is not None:
        sft.save(partial)
        say(
            f"demo warm start: stopped by {stop.signal} after batch {sft.done}/{total}; its state is saved in "
            f"{partial} and the next build resumes from it"
        )
        raise KeyboardInterrupt
    with atomic_directory(out, overwrite=True) as tmp:
        save_state_dict(model, tmp, torch.float32)  # the tied head is stored once, as the embedding
        model.config.dtype = "float32"
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        losses = sft.losses
        record = dict(
            warm_start=asdict(cfg),
            sft_sequences=len(rows) * cfg.epochs,
            sft_tokens=sum(r.tokens for r in rows) * cfg.epochs,
            first_loss=losses[0],
            final_loss=sum(losses[-FINAL_LOSS_BATCHES:]) / len(losses[-FINAL_LOSS_BATCHES:]),
            seconds=round(time.perf_counter() - start, 1),
            resumed_after_batch=resumed_at,  # the seconds are this session's only
            torch_threads=torch.get_num_threads(),
            machine=host(),
            machine_line=host_line(),
        )
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
    partial.unlink(missing_ok=True)
    say(f"demo warm start: {out.name} built in {record['seconds']:.0f} s, final SFT loss {record['final_loss']:.3f}")


__all__ = ["ALIAS", "default_folder", "parse_alias", "warm_start"]
