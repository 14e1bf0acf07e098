"""The lean DLER trainer: data, rewards, rollouts (vLLM), FSDP2 policy update, checkpoints, CLI."""
