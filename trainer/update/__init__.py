"""From scored groups to an optimizer step: advantages, packed micro-batches, the policy's passes, the optimizer.

global_batch.py      advantages over every rank's batch (the kernel over the global batch), back as update rows
packing.py           UpdateRow, the token-budget plan of micro-batches, the packed rows a model reads
policy.py            the two passes: old/reference log-probs (no grad) and the loss's forward and backward
fused_head.py        the LM head stood in for by a fused dler_kernels linear_* kernel, or an fp32 matmul
loss_metrics.py      one mini-batch's loss figures, token-weighted and reduced over the ranks
mismatch_metrics.py  the trainer-sampler log-prob mismatch of a step's batch (and what the correction did)
optim.py             AdamW, its learning-rate schedule, gradient clipping under FSDP2
"""
