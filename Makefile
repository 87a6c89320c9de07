# Entry points for people and CI. `make run` and `make test` each set the machine up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-host.sh
	bash scripts/setup-host.sh
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The main job: build the armv7 guest artifacts, then verify a live migration with them.
run: setup
	$(VENV)/bin/dirtylog make-and-verify

# Everything, end-to-end tests with real QEMU migrations included.
test: setup
	$(PY) -m pytest -v -rs

# Unit tests only (no guest boots).
test-fast: setup
	$(PY) -m pytest -v -rs -m "not e2e"

clean:
	rm -rf $(VENV) artifacts dirtylog-runs
