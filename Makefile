# The README's commands for a fresh machine.  `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run run-h3 cluster test lint typecheck pytest jstest soak soak-membership sim clean

# setup.py compiles these with mypyc: editing one rebuilds (raft/_build.py refuses stale builds).
COMPILED := $(shell sed -n 's/^    "\([a-z]*\/[a-z_]*\.py\)",$$/\1/p' setup.py)

$(STAMP): pyproject.toml setup.py $(COMPILED)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# One node (a single-node cluster) with its data in ./data, clients on 127.0.0.1:7400, the
# HTTP port (health, /metrics, the WebSocket protocol at /v1/ws) on 127.0.0.1:7600.
run: $(STAMP)
	@echo "clients: 127.0.0.1:7400  HTTP: http://127.0.0.1:7600 (WebSocket: ws://127.0.0.1:7600/v1/ws)"
	@echo "demo chat page: open http://127.0.0.1:7600/ in a browser"
	$(BIN)/ctxstore serve --data-dir ./data --listen 127.0.0.1:7400 --http 127.0.0.1:7600

# The same, with HTTP/3 and WebTransport (https://127.0.0.1:7600/v1/wt, UDP) and a new
# self-signed certificate in ./data/tls; its SHA-256 is printed (serverCertificateHashes).
run-h3: $(STAMP)
	$(BIN)/python -m ctxstore.tlscert ./data/tls
	@echo "WebTransport: https://127.0.0.1:7600/v1/wt  demo (over WebTransport by itself): http://127.0.0.1:7600/"
	$(BIN)/ctxstore serve --data-dir ./data --listen 127.0.0.1:7400 --http 127.0.0.1:7600 \
		--h3 127.0.0.1:7600 --tls-cert ./data/tls/h3-cert.pem --tls-key ./data/tls/h3-key.pem

# A local 3-node cluster (clients on 127.0.0.1:7400-7402) until Ctrl-C.
cluster: $(STAMP)
	$(BIN)/ctxstore cluster up --nodes 3 --base-port 7400 --data-dir ./data/cluster

test: lint typecheck pytest jstest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy raft wire ctxstore bench

pytest: $(STAMP)
	$(BIN)/pytest -q -n auto --durations=10

# The browser client (clients/js) under Node's own test runner, against a real node; Node 20
# needs --experimental-websocket for its WebSocket (later versions have it on).
NODE_WS := $(shell { node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)'; } 2>/dev/null || echo --experimental-websocket)
jstest: $(STAMP)
	@command -v node >/dev/null || { echo "jstest: node (>= 20) is required" >&2; exit 1; }
	node $(NODE_WS) --test clients/js/test/*.test.js

# Long deterministic-simulation run (not part of `make test`): SEEDS=first-last.
SEEDS ?= 1-10000
soak: $(STAMP)
	$(BIN)/python -m tests.sim --seeds $(SEEDS) --nodes 3 --groups 3 --ticks 2000 --jobs 0
	$(BIN)/python -m tests.sim --seeds $(SEEDS) --nodes 5 --groups 3 --ticks 2000 --jobs 0

# Scale-out under faults (tests/sim/membership.py): joins, drains, removals; MSEEDS=first-last.
MSEEDS ?= 1-1000
soak-membership: $(STAMP)
	$(BIN)/python -m tests.sim --membership --seeds $(MSEEDS) --nodes 5 --groups 3 --ticks 800 --jobs 0

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build raft/*.so ctxstore/*.so wire/*.so *__mypyc*.so
