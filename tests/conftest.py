import os

# Triton decides at kernel-definition time whether to interpret: set before anything imports
# dler_kernels, so that the Triton kernels run on the CPU in this suite.
os.environ.setdefault("TRITON_INTERPRET", "1")
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in each worker of `pytest -n N` (make test runs 2)
if WORKER:
    # N workers on N cores: one thread each, here and in every process a test starts (they inherit it).
    # torch's OpenMP threads spin while they wait for a core, burning what the other worker needs.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder of the session that every xdist worker sees (their common parent), or the session's own."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if WORKER else base) / name
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def built_once(folder: Path):
    """Held while ``folder`` is built: the first worker builds it, the others wait and reuse it."""
    with FileLock(str(folder) + ".lock", timeout=900):
        yield


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A private DLER_CACHE for the session (shared by its workers): tests build their models from scratch."""
    path = shared_dir(tmp_path_factory, "dler-cache")
    old = os.environ.get("DLER_CACHE")
    os.environ["DLER_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DLER_CACHE", None)
    else:
        os.environ["DLER_CACHE"] = old


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    from trainer.models.resolve import prepare_smollm2

    with built_once(model_cache / "smollm2"):
        return prepare_smollm2(out=model_cache / "smollm2")


@pytest.fixture(scope="session")
def tiny_llama_dir(model_cache) -> Path:
    from trainer.models.resolve import build_tiny_model

    with built_once(model_cache / "tiny-llama"):
        return build_tiny_model("llama", out=model_cache / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(model_cache) -> Path:
    from trainer.models.resolve import build_tiny_model

    with built_once(model_cache / "tiny-qwen2"):
        return build_tiny_model("qwen2", out=model_cache / "tiny-qwen2")


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The demo's policy at toy size: a few SFT batches on verbose chains (seconds, not minutes); built once
    for the session's workers (the warm start's own lock)."""
    from trainer.models.demo import WarmStartConfig
    from trainer.models.warm_start import warm_start

    cfg = WarmStartConfig(
        examples=96,
        batch_sequences=16,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
    )
    return warm_start(cfg, out=shared_dir(tmp_path_factory, "demo") / "model", progress=False)
