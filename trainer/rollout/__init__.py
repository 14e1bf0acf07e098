"""Who generates: the rollout engines behind one contract, and what the loop and ``dler eval`` ask of them.

contract.py        the engine contract: Sample, the RolloutEngine protocol, the input checks every engine shares
engines.py         the choice of engine by name (make_engine: "vllm" | "hf")
vllm_engine.py     VLLMEngine: vLLM colocated with the trainer, weights synced between steps
hf_engine.py       HFEngine: transformers' generate, for machines without vLLM and as the tests' oracle
engine_log.py      where an engine's own output goes (engine.log; errors on the console)
engine_process.py  EngineProcess: an engine in its own process, every call bounded (the asynchronous loop's)
sampling.py        dynamic sampling: generate, score and filter groups until the step's batch is full
async_rollout.py   asynchronous rollouts: batch b sampled with the weights of step b-1-k while the trainer updates
correction.py      rollout correction: loss weights and masks for the sampler/trainer gap (algorithm.rollout_correction)
budget_forcing.py  generation under a thinking budget (dler eval --think-budget)
"""
