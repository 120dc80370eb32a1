# protoseg-kernels: `make bench` (set up, build, benchmark), `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Every fused backend must run in the test suite: a missing one fails instead of skipping.
# (cuda: the real CUDA extension must be built and register its kernels, GPU or not.)
REQUIRED_BACKENDS ?= cpu,cuda_emulated,cuda,triton
# GPU architectures of the CUDA build (SASS for sm_80 and sm_90; sm_80 code also runs on
# sm_86/sm_89). `pip install .` without make defaults to 8.0;8.6;9.0+PTX (setup.py).
CUDA_ARCHS ?= 8.0;9.0
STAMP := $(VENV)/.protoseg-installed
BUILD_INPUTS := setup.py pyproject.toml requirements-dev.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: install test kernel-report bench bench-smoke lint env demo demo-docs fuzz gpu-check gpu-check-dry-run clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when the requirements or the extension sources changed.
$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PIP) install --disable-pip-version-check -r requirements-dev.txt
	PROTOSEG_BUILD_EMULATION=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(PIP) install --disable-pip-version-check --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: install kernel-report
	PROTOSEG_REQUIRE_BACKENDS=$(REQUIRED_BACKENDS) $(PY) -m pytest -q

# Registers, spills and shared memory of every GPU kernel, compiled ahead of time for
# sm_80 and sm_90 (no GPU needed); fails on any spill.
kernel-report: install
	$(PY) -m benchmarks.kernel_report

# The benchmark suite (docs/benchmarks.md): prints the table and writes JSON, CSV,
# markdown and plots to benchmarks/results/<device>/. BENCH_ARGS="--suite full", ...
BENCH_ARGS ?=
bench: install
	$(PY) -m benchmarks $(BENCH_ARGS)

# Every benchmark row at tiny sizes in one process, about 40 s: a first look, not a measurement.
bench-smoke: install
	$(PY) -m benchmarks --suite smoke

# The differential fuzzer (tests/fuzz.py) for FUZZ_SECONDS with a fresh seed (make test runs
# one minute of it with a fixed seed). FUZZ_ARGS="--seed 7 --backends cpu" reruns a case.
FUZZ_SECONDS ?= 600
FUZZ_ARGS ?=
fuzz: install
	$(PY) tests/fuzz.py --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)

# On a bare GPU machine (its own Python, torch, triton and CUDA toolkit; no venv, nothing
# downloaded): build in place for the GPU, run the GPU tests and the GPU benchmark rows,
# logs and JSON into RESULTS (docs/gpu-check.md). Needs no `make install`.
GPU_PYTHON ?= python3
RESULTS ?= gpu-results
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check --results $(RESULTS)

# The same plan without a GPU: a scratch build for sm_90, the GPU tests collected, the
# benchmark entry point on the CPU.
gpu-check-dry-run: install
	$(PY) -m benchmarks.gpu_check --dry-run --arch 9.0 --results $(RESULTS)

lint: install
	$(PY) -m ruff check .

env: install
	$(PY) -m protoseg_kernels.env

# The ProtoSeg, linear and ContrastiveSeg heads on the embedded synthetic dataset, on the CPU.
# Passive OpenMP waiting keeps torch's threads from spinning against other load.
demo: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m protoseg.demo --out runs/demo

# The demo, then its results (with date, machine and commit) written into docs/training.md.
demo-docs: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m protoseg.demo --out runs/demo --docs docs/training.md

clean:
	rm -rf build *.egg-info protoseg_kernels/*.so protoseg_kernels/_build_info.json
