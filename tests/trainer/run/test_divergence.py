"""A diverged run's way on: which checkpoint is good (checked figures, not just finite weights), the error's
advice, and a step that blows the weights up counted as diverged."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.checkpoint.checkpointer import divergence_message
from trainer.run.schedule import WEIGHT_NORM_FACTOR, checkpoint_trouble, divergence

OUT = Path("/runs/x")
UPDATE = {"optimizer_steps": 1, "skipped_steps": 0, "loss": 0.1}


def health(weight_norm=19.5, start=19.1, loss=0.1, grad_norm=0.7):
    return {"loss": loss, "grad_norm": grad_norm, "weight_norm": weight_norm, "start_weight_norm": start}


def test_a_checkpoint_is_good_only_when_its_figures_were_checked_and_pass():
    assert checkpoint_trouble(health()) is None
    assert checkpoint_trouble(health(loss=None, grad_norm=None)) is None  # a step with no optimizer step
    # optim.lr=1e9: step 1's loss and gradient were finite, its weights finite but 1.5e10 times the start's
    assert checkpoint_trouble(health(weight_norm=2.82e11)) == (
        "its weights' norm is 2.82e+11, 1.48e+10 times the 19.1 the run started from"
    )
    assert checkpoint_trouble(health(weight_norm=19.1 / (WEIGHT_NORM_FACTOR * 1.01))).startswith("its weights' norm")
    assert checkpoint_trouble(health(weight_norm=19.1 * WEIGHT_NORM_FACTOR)) is None  # the bound itself passes
    assert checkpoint_trouble(health(loss=math.nan)) == "its step's loss was nan"
    assert checkpoint_trouble(health(grad_norm=math.inf)) == "its step's gradient norm was inf"
    assert checkpoint_trouble(None) == "it carries no health figures (saved by an older dler)"
    assert "started from is unknown" in checkpoint_trouble(health(start=None))


def test_the_error_offers_only_a_good_checkpoint_and_the_command_that_continues_from_it():
    said = "step 3: training diverged (the loss is not finite, optim.lr=0.1); stopped without saving this state; "
    step = {s: OUT / "checkpoints" / f"step-0000000{s}" for s in (1, 2)}

    message = divergence_message(
        OUT, 3, "the loss is not finite", 0.1, [(2, step[2], health()), (1, step[1], health())]
    )
    assert message == said + (
        f"the last good checkpoint is {step[2]} (step 2: finite loss and gradient norm, weights' norm 1.02 times the "
        f"start's): continue from it with `dler train --resume {OUT} optim.lr=SMALLER`"
    )

    ruined = health(weight_norm=2.82e11)
    message = divergence_message(OUT, 3, "the loss is not finite", 0.1, [(2, step[2], ruined), (1, step[1], health())])
    assert message == said + (
        f"the newest good checkpoint is {step[1]} (step 1: finite loss and gradient norm, weights' norm 1.02 times "
        "the start's; the newer step 2's is not: its weights' norm is 2.82e+11, 1.48e+10 times the 19.1 the run "
        f"started from): continue from it with `dler train --resume {OUT} --from-step 1 optim.lr=SMALLER`"
    )

    for only in (ruined, None):  # a ruined checkpoint, or one nobody checked: neither is called good
        message = divergence_message(OUT, 3, "the loss is not finite", 0.1, [(1, step[1], only)])
        assert "good checkpoint is" not in message and "--resume" not in message
        assert message.startswith(said + "no checkpoint of the run is known to be good (the newest, step 1's: ")
        assert message.endswith(
            f"start over in a new folder with `dler train {OUT}/config.yaml run.out={OUT}-restart optim.lr=SMALLER`"
        )

    assert divergence_message(OUT, 1, "the loss is not finite", 0.1, []) == (
        "step 1: training diverged (the loss is not finite, optim.lr=0.1); stopped without saving this state; "
        f"no checkpoint was saved yet: start over with `dler train {OUT}/config.yaml run.out={OUT} optim.lr=SMALLER`"
    )


def test_a_step_that_blows_the_weights_up_diverges_though_every_weight_is_finite():
    torch.manual_seed(0)
    policy = nn.Linear(8, 8)
    start = float(torch.cat([p.detach().flatten() for p in policy.parameters()]).norm())
    assert divergence(UPDATE, policy, start) is None
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1e9)  # what one step at optim.lr=1e9 does
    why = divergence(UPDATE, policy, start)
    assert why is not None and why.startswith("the weights' norm is ") and "1e+09 times the" in why
    assert divergence(UPDATE, policy, None) is None  # the start unknown (a resume of an older run): not judged
    with torch.no_grad():
        policy.weight[0, 0] = math.inf
    assert divergence(UPDATE, policy, start) == "the weights hold NaN or inf values after the update"


@pytest.mark.parametrize("scale", [1.0, 1e9])
def test_a_saved_checkpoint_carries_its_health_and_the_error_reads_it(scale, tiny_llama_dir, tmp_path, capsys):
    """Through the checkpointer and real checkpoint files: the figures saved, a warning for a ruined one, and the
    error's judgement read back from state.json."""
    from transformers import AutoModelForCausalLM

    from trainer.checkpoint.checkpointer import Checkpointer
    from trainer.config import load_config
    from trainer.data import Example, PromptStream
    from trainer.run.run_log import RunLog
    from trainer.update.optim import build_optimizer, build_scheduler

    out = tmp_path / "run"
    cfg = load_config("toy-cpu", [f"run.out={out}"])
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    optimizer = build_optimizer(policy, cfg.optim)
    parts = (policy, optimizer, build_scheduler(optimizer, cfg.optim, cfg.run.steps))
    stream = PromptStream([Example("1 + 1?", "2", "q0", "test")], seed=0)
    log = RunLog(cfg, out, is_main=True, progress=False)
    checkpointer = Checkpointer(cfg, out, tiny_llama_dir, parts, stream, None, log)
    checkpointer.measure_start()
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(scale)
    checkpointer.save(1, {}, {"loss": 0.1, "grad_norm": 0.5})
    warned = [line for line in capsys.readouterr().err.splitlines() if "not a good one" in line]
    message = str(checkpointer.divergence_error(2, "the loss is not finite"))
    if scale == 1.0:
        assert warned == [] and "the last good checkpoint is" in message and "weights' norm 1 times" in message
    else:
        assert len(warned) == 1 and "1e+09 times the" in warned[0]
        assert "no checkpoint of the run is known to be good" in message and "1e+09 times the" in message
