# promptpix developer commands. `make test` is what CI runs (.ci/run).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser tools kubectl deploy-tools test lint up reliability bench demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# setuptools >= 77 (pyproject.toml's build requirement) also for tests/e2e/test_readme.py's
	# offline, non-isolated dry run of the README's install line.
	$(BIN)/pip install -q --upgrade pip 'setuptools>=77'
	# torch pinned first, from this exact version (the CPU wheel on CPU machines).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# Debian's Chromium for the browser test (tests/e2e/test_web.py, driven by Playwright for
# Python from the dev extra). Where it cannot be installed, that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  >/dev/null; } || echo "make: could not install chromium; the browser test will be skipped"

# Offline validation of deploy/kubernetes (tests/deploy): Debian's kubectl, whose built-in
# kustomize (v2.0.3) is the oldest the manifests must render with, and checkov in a venv of
# its own (the `deploy` extra: checkov pins packaging<24 and networkx<2.7, older than the
# dev extra's pytest and torch take). Where either cannot be installed, the tests that need
# it skip and say why.
DEPLOY_VENV := $(VENV)/deploy
kubectl:
	@command -v kubectl >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  kubernetes-client >/dev/null; } || echo "make: could not install kubectl; tests/deploy will be skipped"

$(DEPLOY_VENV)/.installed: pyproject.toml
	@{ { test -x $(DEPLOY_VENV)/bin/python || $(PY) -m venv $(DEPLOY_VENV); } \
	  && $(DEPLOY_VENV)/bin/pip install -q --upgrade pip \
	  && $(DEPLOY_VENV)/bin/pip install -q '.[deploy]' && touch $@; } \
	  || echo "make: could not install checkov; its test in tests/deploy will be skipped"

deploy-tools: $(DEPLOY_VENV)/.installed

# curl and jq: the README's walk-through uses them and tests/e2e/test_readme.py runs it
# (it skips, saying why, where they are missing).
tools:
	@command -v curl >/dev/null 2>&1 && command -v jq >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] \
	  && command -v apt-get >/dev/null && apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl jq >/dev/null; } \
	  || echo "make: could not install curl and jq; the README test will skip the curl steps"

test: $(STAMP) browser tools kubectl deploy-tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

# Long scenarios: repeated fault injection, load, full fuzzing.
reliability: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/api.py --no-write

up: $(STAMP)
	$(BIN)/promptpix up

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
