"""A stand-in for `dler train` in `dler study`'s tests: started with a run's command line, it writes `started`
into the run folder (run.out=..., or --resume's folder), then behaves as FAKE_TRAIN says:

finish  write a finished summary.json and exit 0
fail    exit 2
stop    on SIGINT, as a training run does: finish the step (a short sleep), write a checkpoint folder and the
        number of SIGINTs received into `stopped`, exit 130
ignore  ignore SIGINT and never end (the study has to kill it)
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

STEP_S = 1.0  # the rest of the step a stopped run finishes: long enough that a kill would come first


def main(argv: list[str]) -> int:
    if "--resume" in argv:
        out = Path(argv[argv.index("--resume") + 1])
    else:
        out = Path(next(a for a in argv if a.startswith("run.out=")).split("=", 1)[1])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "argv.jsonl", "a") as f:
        f.write(json.dumps(argv) + "\n")
    mode = os.environ.get("FAKE_TRAIN", "finish")
    if mode == "fail":
        return 2
    if mode == "finish":
        summary = {"finished": True, "steps": 1, "before": {"accuracy": 0.5, "mean_length": 100.0}}
        summary["after"] = {"accuracy": 0.6, "mean_length": 40.0}
        (out / "summary.json").write_text(json.dumps(summary))
        return 0
    signals = []
    if mode == "stop":
        signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    (out / "started").write_text(str(os.getpid()))
    while not signals:
        time.sleep(0.05)
    time.sleep(STEP_S)
    step = out / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    (step / ".dler-complete").write_text("")
    (out / "stopped").write_text(str(len(signals)))
    return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
