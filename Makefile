# bnlab — setup, tests, benchmarks and the study.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup data browser test test-slow bench study clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	@$(MAKE) --no-print-directory data browser
	touch $(STAMP)

# Fashion-MNIST from Debian's package where apt-get works as root; harmless elsewhere.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then \
	  echo "Fashion-MNIST found in /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "note: could not install dataset-fashion-mnist; bnlab will download Fashion-MNIST when needed"; \
	else \
	  echo "note: not root or no apt-get; bnlab will download Fashion-MNIST when needed (or set BNLAB_DATA)"; \
	fi

# Headless Chromium for the report's browser test and `bnlab report --screenshots`: Debian's package where
# apt-get works as root (Playwright drives it through executable_path; no browser download).
browser:
	@if command -v chromium >/dev/null 2>&1; then \
	  echo "chromium found: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && apt-get install -y -qq chromium) \
	    || echo "note: could not install chromium; the browser test will be skipped"; \
	else \
	  echo "note: not root or no apt-get; install chromium (or set BNLAB_CHROMIUM) for the browser test"; \
	fi

test: setup
	$(PY) -m pytest -q -n 2 --timeout 600

test-slow: setup
	$(PY) -m pytest -q -m slow --timeout 3600

bench: setup
	$(PY) benchmarks/bn_cpu.py

study: setup
	$(VENV)/bin/bnlab study --profile quick --out study-out

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
