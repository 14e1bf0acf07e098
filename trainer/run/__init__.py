"""What a run shows and decides around each step: its record, its schedule, its held-out evaluation.

run_log.py       RunLog: config.yaml, metrics.jsonl, the console table, external loggers, summary.json, curves.png
step_metrics.py  a step's metrics record: loss figures summed, every rank's rollout statistics gathered
step_timer.py    wall-clock seconds of a step's phases
schedule.py      RunControl: stop requests, divergence, whether the held-out evaluation is due
heldout.py       HeldOutEval: accuracy and lengths on eval.data, every rank sampling its share
"""
