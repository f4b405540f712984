# difflab: `make train` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.difflab-installed
# torch/torchvision are pinned: these builds lie on the build machine's disk (others download GBs).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install data train test test-slow lint format clean bench

install: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

# Offline Fashion-MNIST from Debian's package, when it is missing and apt is usable.
data:
	@if [ ! -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null) || \
	      echo "warning: could not install dataset-fashion-mnist; data=fashion_mnist will explain how to get it"; \
	  else \
	    echo "note: $(FASHION_DIR) missing and apt-get unusable; data=fashion_mnist will explain how to get it"; \
	  fi; \
	fi

train: install
	$(VENV)/bin/difflab-train $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

# Exit status 5 = no test carries the mark yet: not a failure.
test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS) || [ $$? -eq 5 ]

lint: install
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments

format: install
	$(VENV)/bin/ruff check --fix src tests experiments
	$(VENV)/bin/ruff format src tests experiments

# Every generated table of experiments/benchmarks/RESULTS.md, rewritten from raw/*.jsonl (no measuring).
.PHONY: report
report: install
	$(PY) experiments/benchmarks/protocol.py --report

clean:
	rm -rf logs outputs multirun .pytest_cache
