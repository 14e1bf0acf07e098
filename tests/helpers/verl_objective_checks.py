"""Runs in the verl venv (`make verl-env`): every objective verl 0.9.1 ships, on the same logits, against
dler_kernels.policy_loss with the matching objective, on each backend; prints one JSON object of measured
differences (loss, d loss / d logits); tests/integrations/test_verl.py (its objectives section) asserts on it.

    .venv-verl/bin/python tests/helpers/verl_objective_checks.py
"""

from __future__ import annotations

import json
import warnings

import torch

warnings.simplefilter("ignore")
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402

import dler_kernels as dk  # noqa: E402

B, T, V = 5, 7, 11
# verl's name -> (ours, our options besides the bounds): the same loss, verl reading the bounds from its config
OBJECTIVES = {
    "vanilla": ("ppo_clip", {}),
    "gspo": ("gspo_token", {}),
    "cispo": ("cispo", {"cispo_clip": "both"}),
    "sapo": ("sapo", {}),
    "geo_mean": ("gmpo", {}),
    "dppo_tv": ("dppo_tv", {}),
    "dppo_kl": ("dppo_kl", {}),
}
# verl aggregates SAPO with seq-mean-token-mean and GMPO with a mean over sequences whatever loss_agg_mode says
FIXED_AGG = {"sapo": "seq-mean-token-mean", "geo_mean": "seq-mean-token-mean"}
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# bounds that make every branch act on these inputs: the ratios below spread over about [0.3, 3]
BOUNDS = {"vanilla": (0.2, 0.28), "gspo": (0.05, 0.1), "cispo": (0.2, 0.28), "geo_mean": (0.4, 0.4),
          "dppo_tv": (0.01, 0.02), "dppo_kl": (0.002, 0.004)}  # fmt: skip
# (measured on seeds 0 and 1: the DPPO masks drop 2-4 of the 21 tokens, the ratio cap acts at seed 1)
CLIP_C = 3.0  # the dual clip (vanilla) and DPPO's ratio cap both read clip_ratio_c in verl


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False  # a one-token response
    mask[4, 2:] = False
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    old = logp + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios e^(+-0.6 sigma)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv[0] = -1.3
    return logits, targets, old, adv, mask


def verl_side(name, mode, logits, targets, old, adv, mask):
    low, high = BOUNDS.get(name, (0.2, 0.28))
    cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, clip_ratio=0.2, clip_ratio_low=low, clip_ratio_high=high,
                          clip_ratio_c=CLIP_C, ppo_micro_batch_size_per_gpu=1)  # fmt: skip
    x = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(x, -1).gather(-1, targets[..., None])[..., 0]
    fn = core_algos.get_policy_loss_fn(name)
    loss = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask.double(), loss_agg_mode=mode,
              config=cfg)[0]  # fmt: skip
    loss.backward()
    return loss.detach(), x.grad


def dler_side(name, mode, backend, logits, targets, old, adv, mask):
    objective, extra = OBJECTIVES[name]
    low, high = BOUNDS.get(name, (None, None))
    options = dict(objective=objective, loss_agg=mode, norm_length=float(T), **extra)
    if name != "sapo":
        options.update(eps_low=low, eps_high=high)
    if name == "vanilla":
        options["clip_c"] = CLIP_C
    if name.startswith("dppo"):
        options["ratio_cap"] = CLIP_C
    rows = mask.reshape(-1)
    seq = torch.arange(B)[:, None].expand(B, T).reshape(-1)
    x = logits.reshape(B * T, V).clone().requires_grad_(True)
    out = dk.policy_loss(x, targets.reshape(-1), old.reshape(-1), adv.reshape(-1), rows, seq_ids=seq, backend=backend,
                         **options)  # fmt: skip
    out.loss.backward()
    return out.loss.detach().double(), x.grad.reshape(B, T, V)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    results = {}
    backends = [b for b in ("reference", "cpu") if dk.available_backends().get(b)]
    for name in OBJECTIVES:
        for mode in MODES if name not in FIXED_AGG else (FIXED_AGG[name],):
            for seed in (0, 1):
                data = inputs(seed)
                loss_v, grad_v = verl_side(name, mode, *data)
                for backend in backends:
                    loss_d, grad_d = dler_side(name, mode, backend, *data)
                    results[f"{name}/{mode}/{backend}/{seed}"] = {
                        "loss_rel": rel(loss_d, loss_v), "grad_rel": rel(grad_d, grad_v),
                        "grad_norm": grad_v.norm().item(),
                    }  # fmt: skip
    print(json.dumps({"backends": backends, "cases": results}))


if __name__ == "__main__":
    main()
