# The two commands: `make demo` and `make test`. Both create .venv (Python 3.11) and install the exact
# pins in requirements/lock.txt on first use; the venv is reused until the pins or setup.py change.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON311 ?= $(shell command -v python3.11 || command -v python3)
PINS_HASH := $(shell cat requirements/lock.txt setup.py | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(PINS_HASH)
PYTEST_ARGS ?=
# Two workers, one test file each at a time: the suite is compile-bound and single-threaded per file.
PYTEST_WORKERS ?= 2

.PHONY: demo test test-tpu install clean-venv

install: $(STAMP)

$(STAMP): requirements/lock.txt setup.py
	@$(PYTHON311) -c 'import sys; assert sys.version_info[:2] == (3, 11), "e4t-jax pins are for Python 3.11, got " + sys.version' 
	@test -x $(PY) || $(PYTHON311) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (first run only; a few minutes)…"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/e4t demo

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest tests -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# TPU ahead-of-time compiles from this CPU machine (issue 18): libtpu in a layer of its own, not in .venv.
TPU_LAYER ?= .venv-tpu
TPU_STAMP := $(TPU_LAYER)/.installed-$(shell sha256sum requirements/tpu.txt | cut -c1-16)

$(TPU_STAMP): requirements/tpu.txt $(STAMP)
	@echo "installing libtpu into $(TPU_LAYER) (first run only; ~213 MB)…"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --target $(TPU_LAYER) -r requirements/tpu.txt
	@rm -f $(TPU_LAYER)/.installed-*
	@touch $@

test-tpu: $(TPU_STAMP)
	PYTHONPATH=$(TPU_LAYER) JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 $(PY) -m pytest tests/test_tpu.py $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV) $(TPU_LAYER)
