# Entry points for people and CI. `make run` and `make test` each set the machine up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-docker setup-podman run test test-fast test-container check-setup clean

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

# A container engine (Debian's docker.io, dockerd started if none answers) and the base image,
# made with debootstrap since no image registry is reachable.
setup-docker: setup
	PYTHON=$(PY) bash scripts/setup-docker.sh .ci-state

# Podman's Docker-compatible API service (rootful, /run/podman/podman.sock) with the base image in
# podman's own storage (copied from docker, else made with debootstrap).
setup-podman: setup-docker
	PYTHON=$(PY) bash scripts/setup-podman.sh .ci-state

# Everything: end-to-end tests with real QEMU migrations and real container builds included.
test: setup setup-docker setup-podman
	$(PY) -m pytest -v -rs
	PYTHON=$(PY) bash scripts/check-setup.sh .ci-state
	PYTHON=$(PY) bash scripts/test-fast.sh

# Unit tests only: no guest boots, no containers, no network, no cross-compilers, no root (as root it
# proves so: scripts/test-fast.sh runs them without network, cross-compilers or capabilities).
test-fast: setup
	PYTHON=$(PY) bash scripts/test-fast.sh

test-container: setup-docker setup-podman
	$(PY) -m pytest -v -rs -m container

# The fresh-machine guard: setup-host.sh in a container from the bare debootstrap base image, then
# the tests that need no QEMU boot, engine or root networking, with every skip a failure.
check-setup: setup-docker
	PYTHON=$(PY) bash scripts/check-setup.sh .ci-state

clean:
	rm -rf $(VENV) artifacts dirtylog-runs
