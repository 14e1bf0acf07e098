"""The lean DLER trainer: data, rewards, rollouts (vLLM), FSDP2 policy update, checkpoints, CLI.

One folder per concern (each ``__init__.py`` maps its modules), top to bottom in import order (a layer imports
only the layers below it; ``tests/test_import_graph.py`` holds the list and checks every import against it):

cli.py, __main__.py  the ``dler`` command line (subcommands import their heavy dependencies lazily)
commands/            the subcommands other than train: eval, merge, drqa-data, study; never imported by the loop
train.py             the training loop of ``dler train``: one step's data flow, top-down
checkpoint/          the run folder on disk: checkpoints saved, verified, loaded; the run's claim on ``run.out``
run/                 what a run shows and decides around a step: its log, metrics, schedule, held-out evaluation
models/              model folders from a name, the demo's warm-started policy and the tiny test models
update/              scored groups to an optimizer step: advantages, packing, the policy's passes, the optimizer
dist/                the process's place in the job, its collectives, the model over the ranks (FSDP2)
config/              the training config: schema, presets, overrides, the run's saved copy
rollout/             who generates: the engine contract, vLLM and transformers engines, dynamic sampling
reward/              what a response is worth: answer checking, length penalties, per-prompt budgets
data/                prompt data sets: loading, the built-in toy task, prompts, a resumable order
model_files/         Hugging Face model folders as files: safetensors weights, tokenizer, the cache
seeds.py             the seeds of the run's random streams
progress.py          progress bars of long phases (one summary line off a terminal)
devices.py           what the compute device can do, asked of torch
chunking.py          grouping items in order under a size limit (micro-batches, weight buckets, shards)
storage_errors.py    file-system failures translated into one-line UserErrors
signals.py           catching SIGINT / SIGTERM for a while (a run's and a study's stop requests)
fsutil.py            writing outputs safely (whole or not at all), the output-folder check, UserError
"""
