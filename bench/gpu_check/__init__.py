"""The GPU acceptance check, ``make gpu-check``: run it from the repository root as

    python -m bench.gpu_check --out gpu-check          # --help: every option; --smoke: tiny shapes, any machine

The folder (``bench`` is a namespace package: its benchmark scripts import each other by bare name, and every
stage process has ROOT/bench on its PYTHONPATH for them):

    __main__.py        the CLI: options, the stage loop under the whole check's deadline, the report
    runner.py          each stage in its own process, killed at its budget; commands in their own process groups
    report.py          gpu_report.json and gpu_report.md from the stage records
    stages.py          the stages in order: names, titles, budgets, and the function each one's process runs
    context.py         StageContext (what a stage records, saved as it goes) and the helpers the stages share
    environment.py     stage 1: versions, the device, copy bandwidth and matmul rate; the carried wheels
    build.py           stage 2: the CUDA wheel built (make wheel-cuda's recipe), installed, tested, into the checkout
    wheel.py           the build's pure parts: the tree export, ptxas' spill report, a wheel's local tag
    pytest_results.py  pytest as a stage's part, and its outcomes read from junit or a killed run's -v lines
    correctness.py     stage 3: pytest -m gpu file by file, a few CPU tests in --smoke, a 3-step dler train
    benchmarks.py      stages 4-6: the logits-path and fused-linear kernel benchmarks, the FSDP2 policy update
"""
