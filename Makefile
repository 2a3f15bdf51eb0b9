# The two commands of README.md: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ti2i-installed

.PHONY: demo test install clean

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
