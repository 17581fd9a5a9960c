# A newcomer needs `make run` and `make test`; each builds the virtualenv it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

RELAY_HOST ?= 0.0.0.0
RELAY_PORT ?= 8787
CLUSTER_REDIS_PORT ?= 6380

.PHONY: run run-cluster test bench redis-server promtool chromium valgrind clean

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

# Debian's prometheus package provides promtool, which checks and unit-tests ops/prometheus/alerts.yml.
# Only promtool is used: the tests need no Prometheus server.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "promtool missing: installing Debian's prometheus"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "promtool is required by the test suite. Install it, e.g. 'sudo apt-get install prometheus'." >&2; exit 1; \
	  fi; }

# Headless Chromium loads the operator page (/ops/dashboard) in tests/ops/test_dashboard_page.py.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "chromium missing: installing Debian's chromium"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; \
	  else \
	    echo "chromium is required by the test suite. Install it, e.g. 'sudo apt-get install chromium'." >&2; exit 1; \
	  fi; }

# `make bench` counts the relay's instructions per callback under callgrind (bench/instructions.py).
valgrind:
	@command -v valgrind >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "valgrind missing: installing Debian's valgrind"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; \
	  else \
	    echo "valgrind is not installed: make bench skips its instruction counts ('sudo apt-get install valgrind')."; \
	  fi; }

run: $(STAMP)
	$(BIN)/gunicorn --config config/gunicorn.py wsgi:app

define WAIT_FOR_REDIS
import sys, time, redis
client = redis.Redis.from_url(sys.argv[1], socket_timeout=1)
for _ in range(50):
    try:
        sys.exit(0 if client.ping() else 1)
    except redis.ConnectionError:
        time.sleep(0.1)
sys.exit(f"run-cluster: no answer from Redis at {sys.argv[1]}")
endef
export WAIT_FOR_REDIS

# Two relay instances (RELAY_PORT and RELAY_PORT+1) of two workers each, sharing one Redis: REDIS_URL when
# set, else a throwaway redis-server on 127.0.0.1:$(CLUSTER_REDIS_PORT) that keeps nothing. Ctrl-C stops all.
# See docs/cluster.md.
run-cluster: $(STAMP)
	@children=""; \
	trap 'kill $$children 2>/dev/null; wait' EXIT; trap 'exit 130' INT TERM; \
	url="$${REDIS_URL:-}"; \
	if [ -z "$$url" ]; then \
	  command -v redis-server >/dev/null || { echo "run-cluster: set REDIS_URL or install redis-server (make redis-server)" >&2; exit 1; }; \
	  redis-server --bind 127.0.0.1 --port $(CLUSTER_REDIS_PORT) --save "" --appendonly no --loglevel warning & children="$$!"; \
	  url="redis://127.0.0.1:$(CLUSTER_REDIS_PORT)/0"; \
	fi; \
	$(BIN)/python -c "$$WAIT_FOR_REDIS" "$$url" || exit 1; \
	for port in $(RELAY_PORT) $$(($(RELAY_PORT) + 1)); do \
	  STORE_BACKEND=redis REDIS_URL="$$url" RELAY_WORKERS="$${RELAY_WORKERS:-2}" RELAY_HOST=$(RELAY_HOST) \
	    RELAY_PORT=$$port AUDIT_LOG_PATH="audit/relay-$$port.jsonl" \
	    $(BIN)/gunicorn --config config/gunicorn.py wsgi:app & children="$$children $$!"; \
	done; \
	echo "run-cluster: relays on $(RELAY_HOST):$(RELAY_PORT) and $(RELAY_HOST):$$(($(RELAY_PORT) + 1)), Redis at $$url"; \
	wait

test: $(STAMP) redis-server promtool chromium
	$(BIN)/python -m pytest -q

bench: $(STAMP) redis-server valgrind
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache
