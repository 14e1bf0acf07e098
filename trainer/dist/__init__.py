"""The process's place in the job and the model over the ranks.

collective.py       whether a group is up, this rank's place, the few collectives outside FSDP's own
distributed_env.py  torchrun's environment read, the device chosen, the default process group joined and left
fsdp.py             the policy (and reference) loaded and sharded with FSDP2 or replicated; full weights gathered
"""
