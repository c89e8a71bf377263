# `make demo` sets up a fresh machine and runs the main job; `make test` runs the whole suite.
# Both ensure the environment first and are safe to repeat.
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian packages: real Fashion-MNIST for the main job; for the tests also a browser, docker-compose
# (validates the deployment without an engine) and PostgreSQL (the distributed end-to-end test).
APT_RUNTIME := dataset-fashion-mnist
APT_TEST := $(APT_RUNTIME) chromium docker-compose postgresql

.PHONY: setup setup-test apt demo test

setup: $(VENV)/.installed
	@$(MAKE) --no-print-directory apt PACKAGES="$(APT_RUNTIME)"

setup-test: $(VENV)/.installed
	@$(MAKE) --no-print-directory apt PACKAGES="$(APT_TEST)"

apt:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=$$(for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi; \
	else echo "note: not root or no apt-get; install $(PACKAGES) yourself (make demo fetches Fashion-MNIST instead)"; fi

# torch 2.14.1 / torchvision 0.29.1 are what these machines install from local disk.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The main job: a real grid on embedded defaults (local Ray, sqlite state and MLflow under .ablate/). Without
# the Debian package and without ABLATE_DATA_DIR, Fashion-MNIST is downloaded once (torchvision, MD5-checked)
# into .ablate/data, and the run reads it from there.
FETCHED := $(abspath .ablate/data)
demo: setup
	@if [ -z "$$ABLATE_DATA_DIR" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  $(VENV)/bin/ablate data fetch fashion-mnist --dir $(FETCHED) && \
	  ABLATE_DATA_DIR=$(FETCHED) $(VENV)/bin/ablate run demo; \
	else $(VENV)/bin/ablate run demo; fi

test: setup-test
	$(PY) -m pytest -q
