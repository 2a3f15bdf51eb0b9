# The two commands of README.md: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ti2i-installed

.PHONY: demo test install clean gpu-check gpu-deps

install: $(STAMP)

# torch is pinned to 2.13.0 (the CPU wheel on local disk); constraints.txt pins every transitive package.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ti2i demo --work work --out outputs

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q  # torch (the reference pipelines) on one thread: ORT sets its own

clean:
	rm -rf work outputs .pytest_cache

# GPU checks (gpu_check/EXPECTED.md): the tests marked gpu and a short benchmark, ~10 minutes on one GPU.
# Runs with the machine's own Python (torch with CUDA; in the container, everything); no venv is made.
# pytest comes from .gpu_deps when that Python has none (`make gpu-deps` fills it, pure Python, to carry).
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR)/.gpu_deps:$$PYTHONPATH $(GPU_PYTHON) -m pytest -q -rs -s -p no:cacheprovider gpu_check
	PYTHONPATH=$(CURDIR)/.gpu_deps:$$PYTHONPATH $(GPU_PYTHON) -m gpu_check.bench

gpu-deps:
	$(BIN)/python -m pip install --quiet --target .gpu_deps pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
		packaging==26.4 Pygments==2.21.0
