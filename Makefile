# A newcomer needs `make run` and `make test`; each builds the virtualenv it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

RELAY_HOST ?= 0.0.0.0
RELAY_PORT ?= 8787

.PHONY: run test bench redis-server clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# The test suite starts its own redis-server processes on free loopback ports.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "redis-server missing: installing Debian's redis-server"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "redis-server is required by the test suite. Install it, e.g. 'sudo apt-get install redis-server'." >&2; exit 1; \
	  fi; }

run: $(STAMP)
	$(BIN)/gunicorn --config config/gunicorn.py wsgi:app

test: $(STAMP) redis-server
	$(BIN)/python -m pytest -q

bench: $(STAMP) redis-server
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache
