# kdq: a newcomer needs two commands, `make demo` and `make test`; both install what is missing.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
RUN := $(UV) run --frozen
PRESET ?= demo

.PHONY: setup demo test test-python test-other-cpu lint format bench bench-accuracy bench-flows bench-sweep gpu-check clean help train-remote image services

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup:  ## Install uv (with pip) if missing, then the locked environment in .venv; Debian packages (as root) if missing
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv
	@$(UV) sync --frozen --quiet
	@# qemu-user: the x86 certificate runs ONNX Runtime's AVX2 kernels under qemu on VNNI CPUs (kdq/cpu.py).
	@# dataset-fashion-mnist: Fashion-MNIST offline (/usr/share/datasets/fashion-mnist; kdq/data.py).
	@# chromium: tests/test_report.py opens report.html in a real (headless) browser.
	@missing=""; command -v qemu-x86_64 >/dev/null 2>&1 || missing="qemu-user"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		$$missing >/dev/null; } || echo "make: install Debian's$$missing (AVX2 int8 certificate, Fashion-MNIST offline, report test)" >&2

demo: setup  ## The whole job offline on the Fashion-MNIST shipped in kdq: teacher, baseline, KD student, certified int8 export
	$(RUN) kdq pipeline --preset $(PRESET) --run-dir runs/$(PRESET) --resume

test: setup lint  ## Lint, then the test suite
	$(RUN) pytest

# A second Python (3.10-3.13 share one uv.lock): pyenv's interpreter if there is one, else python$(PY) on PATH.
PY ?= 3.10
PY_BIN = $(or $(firstword $(wildcard $(HOME)/.pyenv/versions/$(PY).*/bin/python$(PY))),python$(PY))
PYTEST_ARGS ?= -m "not pipeline"
test-python:  ## The suite on another Python in .venv-PY (PY=3.10 default; PYTEST_ARGS= for all of it)
	UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=.venv-$(PY) $(UV) run --frozen --python $(PY_BIN) pytest $(PYTEST_ARGS)

# The tests marked cpu_kind (tests/conftest.py) as the other x86 CPU kind. On a CPU with AVX-512 VNNI: as an
# AVX2-only CPU (KDQ_CPU=avx2, kdq/cpu.py: fbgemm forced to AVX2, ONNX Runtime under qemu). A CPU without VNNI
# cannot be made one (qemu-user has no AVX-512): `make test` there already ran them as AVX2, and this says so.
OTHER_CPU := $(shell grep -qw avx512_vnni /proc/cpuinfo 2>/dev/null && echo avx2)
test-other-cpu: setup  ## The CPU-dependent tests as the other CPU kind (VNNI CPU: KDQ_CPU=avx2)
ifeq ($(OTHER_CPU),)
	@echo "make test-other-cpu: this CPU has no AVX-512 VNNI, and VNNI cannot be emulated (qemu-user has no AVX-512): its own run (make test) is the AVX2 one"
else
	KDQ_CPU=$(OTHER_CPU) $(RUN) pytest -m cpu_kind $(PYTEST_OTHER_CPU_ARGS)
endif

lint: setup  ## ruff lint + format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: setup  ## Apply ruff's fixes and formatting
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

bench: setup  ## Benchmarks (bench/): training img/s, inference latency, MAC floor; BENCH_ARGS=... -> bench/results/
	$(RUN) python -m bench $(BENCH_ARGS)

bench-accuracy: setup  ## Fashion-MNIST, 10k test images: teacher, baseline, KD, DIST (5 seeds), int8; recipe fashion-mnist-cpu (~45 min, 2 cores)
	$(RUN) python -m bench.accuracy $(BENCH_ARGS)

bench-sweep: setup  ## kdq sweep on Fashion-MNIST (fashion-mnist-cpu): students within 0.35 ms int8 on this CPU, certified, vs the int8 teacher (~20 min)
	$(RUN) python -m bench.sweep $(BENCH_ARGS)

# bench-flows: one run, three QAT students of its float student; FLOWS=fashion-mnist: fashion-mnist-cpu on 5,000
# Fashion-MNIST training images, certified on its 10,000 test images (~45 min on 2 cores), without a latency
# table (each certificate keeps its own grid). A rejected export is a result too (`-`: make goes on; the table
# shows the gates it failed).
FLOWS ?= demo
FLOWS_ARGS_demo := --preset demo
FLOWS_ARGS_fashion-mnist := --preset fashion-mnist-cpu --dataset fashion-mnist --train-subset 5000 --run-dir runs/flows-fashion-mnist
FLOWS_TABLE_fashion-mnist := runs/flows-fashion-mnist --no-latency
# gpu-check needs no setup: a lent GPU machine has no registry, so it runs on that machine's own Python.
GPU_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
gpu-check:  ## What only a GPU runs: bf16, SyncBatchNorm, streaming, PT2E QAT, a preset epoch (<= 8 min); GPU_ARGS=--full
	PYTHONPATH=.$(if $(PYTHONPATH),:$(PYTHONPATH)) $(GPU_PYTHON) -m bench.gpu_check $(GPU_ARGS)

bench-flows: setup  ## Eager vs PT2E (FLOWS=demo|fashion-mnist): one float student, three certified int8 exports (~15 min)
	-$(RUN) kdq pipeline $(FLOWS_ARGS_$(FLOWS)) --resume
	-$(RUN) kdq pipeline $(FLOWS_ARGS_$(FLOWS)) --resume --target x86-pt2e
	-$(RUN) kdq pipeline $(FLOWS_ARGS_$(FLOWS)) --resume --target mobile
	$(RUN) python -m bench.flows $(or $(FLOWS_TABLE_$(FLOWS)),runs/demo) --name flows-$(FLOWS)

clean:  ## Remove run outputs (keeps .venv)
	rm -rf runs

# Launch anywhere (TorchX, components.py): README "Run on a cluster". The same job on each scheduler, e.g.
#   make train-remote SCHEDULER=local_cwd COMPONENT=distill ARGS="--epochs 1 -j 1x2"
#   make train-remote SCHEDULER=kubernetes IMAGE=registry.example.com/ml/kdq:0.1.0 ARGS="-j 2x1 ..."
SCHEDULER ?= local_cwd
COMPONENT ?= distill
ARGS ?=
TORCHX_RUN_FLAGS ?= --wait  # flags of `torchx run` itself, e.g. --dryrun, --log, -cfg partition=gpu
IMAGE ?= localhost/kdq:latest
CONTAINER_SCHEDULERS := kubernetes local_docker
comma := ,
ENGINE := $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)

train-remote: setup  ## torchx run components.py:COMPONENT (distill) -s SCHEDULER (local_cwd, slurm, kubernetes, local_docker) ARGS=...
	$(RUN) torchx run -s $(SCHEDULER) $(TORCHX_RUN_FLAGS) $(if $(filter $(CONTAINER_SCHEDULERS),$(SCHEDULER)),--workspace "") \
		components.py:$(COMPONENT) $(if $(filter $(CONTAINER_SCHEDULERS),$(SCHEDULER)),--image $(IMAGE)) $(ARGS)

image:  ## Build IMAGE (localhost/kdq:latest) with podman or docker; BASE=image with Python 3.11, CA_BUNDLE=file
	@test -n "$(ENGINE)" || { echo "make image: install podman or docker" >&2; exit 1; }
	$(ENGINE) build --network=host $(if $(BASE),--build-arg BASE=$(BASE)) \
		$(if $(CA_BUNDLE),--secret id=ca$(comma)src=$(CA_BUNDLE)) -t $(IMAGE) .

services:  ## Start (ACTION=stop: stop) the single-machine Slurm cluster of deploy/slurm (root)
	deploy/slurm/local-cluster.sh $(or $(ACTION),start)
