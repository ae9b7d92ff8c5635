# Two entry points (README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

CHROMIUM := /usr/bin/chromium

.PHONY: demo test browser bench info clean

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

test: $(STAMP) browser
	$(PY) -m pytest tests

# Debian's chromium, for tests/test_viz_browser.py (the interactive page in a real headless browser).
# Installed when missing and this user may (root, or sudo without a password); otherwise those tests skip.
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "no $(CHROMIUM) and no apt-get: the browser tests will skip"; \
	elif [ "$$(id -u)" = 0 ]; then echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then echo "installing Debian's chromium (sudo)"; \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no $(CHROMIUM) and no permission to install it: the browser tests will skip"; fi

bench: $(STAMP)
	$(VENV)/bin/attnkit bench

info: $(STAMP)
	$(VENV)/bin/attnkit info

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
