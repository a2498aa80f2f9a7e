# One-command setup: every target below creates .venv/ and installs what it needs when missing.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSDEPS_STAMP := $(VENV)/.sysdeps
PYTEST := $(PY) -m pytest -q

.PHONY: all setup sysdeps test test-all test-slurm test-clients test-compat test-docs demo golden lint clean dist bench-separate bench-speed bench-train figures

all: test

setup: $(STAMP) $(SYSDEPS_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): setup.py requirements.txt requirements_minimal.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	touch $(STAMP)

$(SYSDEPS_STAMP): tools/install_sysdeps.sh | $(PY)
	bash tools/install_sysdeps.sh
	touch $(SYSDEPS_STAMP)

sysdeps: $(SYSDEPS_STAMP)

test: setup
	$(PYTEST) -m "not slow and not slurm"

test-all: setup
	$(PYTEST) -m "not slurm"

test-slurm: setup
	$(PYTEST) -m slurm

# Every command of README.md and docs/ run as written on the toy data (tests/test_doc_commands.py).
test-docs: setup
	$(PYTEST) -m docs

# Real programs built on Demucs (tests/clients/clients.txt) run offline against this project,
# installed with `pip install .` into a scratch venv under build/clients.
test-clients: setup
	$(PY) -m tools.test_clients --torch-spec "$(TORCH_SPEC)"

# A core subset of the tests with the oldest torch setup.py allows and TORCH_SPEC, each with
# numpy 1.26 and 2.x, in scratch venvs under build/compat (tools/compat.py; about 15 minutes).
test-compat: setup
	$(PY) -m tools.compat --torch-spec "$(TORCH_SPEC)" --python "$(PYTHON)"

demo: setup
	$(PY) -m tools.demo

# Rerun the measurements behind the figures of README.md and docs/ into docs/figures/CPU-KIND.json
# (under 30 minutes on 2 cores); FIGURES=demo,onnx reruns some of them.
figures: setup
	$(PY) -m tools.figures $(if $(FIGURES),--only $(FIGURES))

bench-separate: setup
	$(PY) -m tools.bench_separate --minutes 10 60

bench-speed: setup
	$(PY) -m tools.bench --separate

bench-train: setup
	$(PY) -m tools.bench --train

golden: setup
	$(PY) ../shared/golden/check.py

lint: setup
	$(PY) -m flake8 demucs tools tests

# Dora argv of the released XPs: `tar xvf outputs.tar.gz` makes `dora info -f SIG` work.
outputs.tar.gz: setup conf/config.yaml $(wildcard demucs/grids/*.py conf/*/*.yaml)
	$(PY) -m tools.make_outputs -o $@

dist: setup
	$(PY) setup.py sdist

clean:
	rm -rf build dist *.egg-info .pytest_cache
