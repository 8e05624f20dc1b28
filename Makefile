# Nimbus — the two commands: `make run` (portal with demo data at http://127.0.0.1:8000)
# and `make test` (installs what tests need, then runs them).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test setup system venv assets migrate demo serve check bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian packages: bubblewrap (the local engine's sandbox) and Chromium (browser tests).
SYSTEM_PACKAGES := bubblewrap:/usr/bin/bwrap chromium:/usr/bin/chromium prometheus:/usr/bin/prometheus
system:
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
	DEBUG=1 NIMBUS_PUBLIC_URL=$(PUBLIC_URL) $(VENV)/bin/daphne -b $(HOST) -p $(PORT) portal.asgi:application

run: demo serve

test: system setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

check: setup
	DEBUG=0 SECRET_KEY=check-only-$$(date +%s)-0123456789abcdefghijklmnopqrstuvwxyz ALLOWED_HOSTS=nimbus.example.com \
		$(PY) manage.py check --deploy --fail-level WARNING

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) node_modules staticfiles var
