# Two entry points (README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test bench info clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU build of torch first where there is no GPU, so nothing pulls a multi-GB CUDA build.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; $(PIP) install --quiet "torch>=2.5"; \
	else \
		echo "no GPU: installing the CPU build torch==2.13.0"; $(PIP) install --quiet torch==2.13.0; \
	fi
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnkit demo

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(VENV)/bin/attnkit bench

info: $(STAMP)
	$(VENV)/bin/attnkit info

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
