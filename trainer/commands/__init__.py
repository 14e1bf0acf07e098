"""The ``dler`` subcommands other than ``train``: never imported by the training loop.

evaluate.py         dler eval: accuracy against tokens (the paper's protocol), per model and benchmark
eval_metrics.py     pass@k, majority vote, the summary of one (model, data set)
eval_report.py      results.md and the plots of dler eval
benchmarks.py       evaluation benchmarks from local files (MATH-500, AIME, AMC, ...), one record normaliser
merge.py            dler merge: magnitude-selective weight merging
merge_selection.py  the top-k |delta| threshold of dler merge (exact, streaming radix selection)
drqa.py             dler drqa-data: concise chains from batched prompts, verbose ones from single prompts
study.py            dler study: a seeded comparison of length penalties on the CPU demo
study_report.py     study.md, study.json and pareto.png of a study
"""
