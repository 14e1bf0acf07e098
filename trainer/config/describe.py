"""The few lines a run prints at its start: what is trained, on what, and how (:func:`describe`)."""

from __future__ import annotations

from .schema import RewardConfig, TrainConfig


def _penalty_text(reward: RewardConfig) -> str:
    p = reward.penalty
    budget = (
        f"DA-DLER budgets {list(reward.da_dler.budgets)} at thresholds {list(reward.da_dler.thresholds)}"
        if reward.da_dler.enabled
        else f"budget {p.length_budget}"
    )
    coef = f", coef {p.truncation_coef:g}" if p.name == "truncation" else ""
    b = reward.budget_schedule
    schedule = f", x{b.decay:g} every {b.every} steps (floor {b.min_budget})" if b.enabled else ""
    return f"{p.name} penalty, {budget}{schedule}{coef}"


def _bounds_text(bounds: tuple[float | None, float | None]) -> str:
    low, high = bounds
    return f"cap {high:g}" if low is None else f"[{low:g}, {high:g}]"


def describe(cfg: TrainConfig) -> str:
    """A few lines for the console at the start of a run: what is trained, on what, and how."""
    s, a, o, r = cfg.rollout.sampling, cfg.algorithm, cfg.optim, cfg.run
    fsdp = {None: "fsdp auto", True: "fsdp on", False: "fsdp off"}[cfg.fsdp.enabled]
    params = a.objective_params()
    bounds = f"clip {params['eps_low']:g}/{params['eps_high']:g}" if "eps_low" in params else ""
    extra = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()
                      if k not in ("eps_low", "eps_high", "clip_c"))  # fmt: skip
    dual = f", dual clip {params['clip_c']:g}" if params.get("clip_c") is not None else ""
    objective = ", ".join(part for part in (a.objective, bounds + dual, extra) if part)
    kl = f", KL {a.kl_type} {a.beta:g}" if a.beta > 0 else ""
    old = "; old log-probs from the sampler (bypass)" if a.old_logprobs == "sampler" else ""
    rc = a.rollout_correction
    correction = f"; rollout correction {rc.mode} {_bounds_text(rc.bounds)}" if rc.mode != "none" else ""
    heads = [side for side, on in (("trainer", a.lm_head_fp32), ("engine", cfg.rollout.lm_head_fp32)) if on]
    fp32_head = f"; fp32 LM head ({', '.join(heads)})" if heads else ""
    dynamic = f", dynamic sampling on {s.dynamic_sampling_on} ({s.max_rounds} rounds)" if s.dynamic_sampling else ""
    boost = f", correct-response boost {a.correct_advantage_boost:g}" if a.correct_advantage_boost else ""
    gfpo = f" (GFPO: the best of {s.gfpo_sample_size} by {s.gfpo_metric})" if s.gfpo_sample_size else ""
    updates = s.prompts_per_step // a.mini_batch_prompts * a.epochs_per_step
    clip = "off" if o.grad_clip is None else f"{o.grad_clip:g}"
    lines = [
        f"model      {cfg.model.path} ({cfg.model.dtype} params, {cfg.model.attn_implementation}, {fsdp})",
        f"data       {cfg.data.train} (template {cfg.data.template}, max prompt {cfg.data.max_prompt_tokens} tokens)",
        f"rollout    {cfg.rollout.engine} {cfg.rollout.dtype}: {s.prompts_per_step} prompts x {s.samples_per_prompt} "
        f"samples{gfpo}, max {cfg.max_response_tokens} tokens, T {s.temperature:g}, top-p {s.top_p:g}{dynamic}",
        f"reward     {cfg.reward.checker} checker; {_penalty_text(cfg.reward)}",
        f"algorithm  {a.advantage} advantages{boost}, {a.loss_agg}, {objective}{kl}; "
        f"{updates} optimizer step(s) per step{old}{correction}{fp32_head}",
        f"optim      AdamW lr {o.lr:g}, wd {o.weight_decay:g}, {o.schedule}, warmup {o.warmup_steps}, grad clip {clip}",
        f"run        {r.steps} steps -> {r.out} (seed {r.seed}, device {r.device}, checkpoint every "
        f"{r.save_every or r.steps})",
    ]
    return "\n".join(lines)
