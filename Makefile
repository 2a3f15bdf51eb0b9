# The two commands of README.md: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ti2i-installed

.PHONY: demo test install clean gpu-check gpu-deps gpu-deps-diffusers

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

# diffusers and what it imports that a torch-only machine lacks, for the method-loop check (gpu_check/EXPECTED.md):
# pure Python but for safetensors (an abi3 wheel: any CPython >= 3.8 on linux x86_64) and PyYAML (its C
# extension is optional); about 42 MB unpacked without .pyc. Pillow must be on that machine already.
gpu-deps-diffusers:
	$(BIN)/python -m pip install --quiet --no-deps --no-compile --target .gpu_deps diffusers==0.42.1 \
		huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 anyio==4.16.0 h11==0.16.0 idna==3.20 \
		truststore==0.10.5 tqdm==4.70.1 PyYAML==6.0.4 importlib_metadata==10.2.0 zipp==4.1.2 click==8.5.1 \
		requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 safetensors==0.8.0
