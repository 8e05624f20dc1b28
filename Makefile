# Nimbus — the two commands: `make run` (portal with demo data at http://127.0.0.1:8000)
# and `make test` (installs what tests need, then runs them).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test setup system sandbox venv assets migrate demo serve check bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian packages the local engine's sandbox needs: bubblewrap, slirp4netns and nftables (egress that
# cannot reach the host), libseccomp2 (the seccomp filter). Without them `make run` stops and says what to run.
SANDBOX_PACKAGES := bubblewrap:/usr/bin/bwrap slirp4netns:/usr/bin/slirp4netns nftables:/usr/sbin/nft \
	libseccomp2:/usr/lib/x86_64-linux-gnu/libseccomp.so.2
sandbox:
	@missing=""; for entry in $(SANDBOX_PACKAGES); do \
		pkg=$${entry%%:*}; bin=$${entry#*:}; \
		if [ "$$pkg" = libseccomp2 ]; then ldconfig -p 2>/dev/null | grep -q libseccomp.so.2 || missing="$$missing $$pkg"; \
		else [ -x "$$bin" ] || missing="$$missing $$pkg"; fi; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing the sandbox:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "The local engine's sandbox needs:$$missing"; \
		echo "Install them with:  sudo apt-get install -y$$missing"; \
		echo "(or run functions without isolation: NIMBUS_LOCAL_SANDBOX=none make run)"; \
		[ "$$NIMBUS_LOCAL_SANDBOX" = none ] || exit 1; fi

# Debian packages the tests use besides the sandbox: Chromium (browser tests) and Prometheus (a real scrape).
SYSTEM_PACKAGES := chromium:/usr/bin/chromium prometheus:/usr/bin/prometheus
system: sandbox
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
		pkg=$${entry%%:*}; bin=$${entry#*:}; [ -x "$$bin" ] || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "please install:$$missing (sandbox and browser tests need them)"; fi

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

assets: node_modules/.installed
	DEBUG=1 $(PY) manage.py nimbus_assets

setup: venv assets

migrate: setup
	DEBUG=1 $(PY) manage.py migrate --noinput

# Invoke URLs shown in the portal follow HOST and PORT unless NIMBUS_PUBLIC_URL says otherwise.
PUBLIC_URL = $${NIMBUS_PUBLIC_URL:-http://$(HOST):$(PORT)}

demo: migrate
	DEBUG=1 NIMBUS_PUBLIC_URL=$(PUBLIC_URL) $(PY) manage.py nimbus_demo

serve:
	DEBUG=1 NIMBUS_PUBLIC_URL=$(PUBLIC_URL) $(PY) -m portal.serve -b $(HOST) -p $(PORT) portal.asgi:application

run: sandbox demo serve

test: system setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

check: setup
	DEBUG=0 SECRET_KEY=check-only-$$(date +%s)-0123456789abcdefghijklmnopqrstuvwxyz ALLOWED_HOSTS=nimbus.example.com \
		NIMBUS_METRICS_TOKEN=check-only-$$(date +%s) $(PY) manage.py check --deploy --fail-level WARNING

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) node_modules staticfiles var
