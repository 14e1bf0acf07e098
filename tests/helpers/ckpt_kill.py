"""Run in a subprocess by tests/trainer/checkpoint/test_checkpoint.py: save checkpoint 1, then block in the middle of
checkpoint 2 (weights written, optimizer not yet) until the test kills this process with SIGKILL.

The block replaces ``trainer.checkpoint.files.write_optimizer``: it writes SIGNAL_FILE (the test's cue to
kill) and sleeps. Nothing in the library knows about it.

usage: python ckpt_kill.py MODEL_DIR RUN_DIR SIGNAL_FILE
"""

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import trainer.checkpoint.files as checkpoint_files
import trainer.checkpoint.manager as checkpoint


def train_step(model, optimizer, scheduler) -> None:
    ids = torch.randint(0, 1000, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def block_until_killed(folder, *args) -> None:
    Path(sys.argv[3]).write_text(str(folder))
    time.sleep(600)
    raise SystemExit("not killed within 600 s")


if __name__ == "__main__":
    model_dir, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    manager = checkpoint.CheckpointManager(run_dir, source_model_dir=model_dir)
    train_step(model, optimizer, scheduler)
    manager.save(1, model, optimizer, scheduler, {"step": 1})
    checkpoint_files.write_optimizer = block_until_killed
    train_step(model, optimizer, scheduler)
    manager.save(2, model, optimizer, scheduler, {"step": 2})
