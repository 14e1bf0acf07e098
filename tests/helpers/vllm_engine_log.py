"""Run in a subprocess by the tests: a real vLLM engine that writes its log to a file, as the trainer's
does (``log_file``); everything else this process prints is what a user's console would show.

The engine samples, reloads its weights (in-process only: the reload streams tensors into the worker),
and then a record at ERROR is logged on a vLLM logger: a real engine error must reach the console.
Prints one JSON object on the last line of stdout.

usage: python vllm_engine_log.py MODEL_DIR LOG_FILE
"""

import json
import logging
import os
import sys

from trainer.rollout.vllm_engine import VLLMEngine

if __name__ == "__main__":
    model_dir, log_file = sys.argv[1], sys.argv[2]
    engine = VLLMEngine(model_dir, max_model_len=128, dtype="float32", seed=0, log_file=log_file)
    groups = engine.generate(["Hello"], n=2, max_tokens=4, temperature=1.0, seed=1)
    in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    if in_process:
        engine.update_weights(list(engine.layout.folder_tensors()))
    logging.getLogger("vllm.dler_test").error("a real engine error")
    engine.close()
    print(json.dumps({"samples": sum(len(g) for g in groups), "reloaded": in_process}))
