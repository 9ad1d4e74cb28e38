#!/bin/bash
# The delay of subscription messages under packet loss, WebSocket vs WebTransport (docs/web.md §8):
#   bench/subdelay_netns.sh [LOSS]      (root, iptables; LOSS 0.05 by default)
# Runs one node and bench/subdelay.py (ws, then wt) in a private network namespace whose
# loopback drops LOSS of the packets it receives (iptables' statistic match), so only this
# run's traffic is touched; prints one JSON line per transport.  RATE (appends/s, 100) and DUR
# (seconds, 15) in the environment.  PYTHON: the interpreter (default python3).
set -euo pipefail
LOSS=${1:-0.05}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ "${SUBDELAY_INSIDE:-}" != 1 ]; then
    NS=ctxstore-subdelay-$$
    ip netns add "$NS"
    trap 'ip netns del "$NS"' EXIT
    SUBDELAY_INSIDE=1 ip netns exec "$NS" "$0" "$LOSS"
    exit
fi
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT
ip link set lo up
D=$(mktemp -d)
"$PY" -m ctxstore.tlscert "$D/tls" >/dev/null
"$PY" -m ctxstore serve --data-dir "$D/n1" --listen 127.0.0.1:7400 --peer-listen 127.0.0.1:7500 \
    --http 127.0.0.1:7600 --h3 127.0.0.1:7600 --tls-cert "$D/tls/h3-cert.pem" \
    --tls-key "$D/tls/h3-key.pem" --groups 8 --tick-ms 20 --wal-writer inline \
    >"$D/node.out" 2>"$D/node.err" &
NODE=$!
trap 'kill $NODE 2>/dev/null; wait $NODE 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 100); do grep -q '"ready"' "$D/node.out" && break; sleep 0.2; done
if [ "$LOSS" != 0 ]; then
    iptables -A INPUT -i lo -m statistic --mode random --probability "$LOSS" -j DROP
fi
for via in ws wt; do
    "$PY" -m bench.subdelay --node 127.0.0.1:7400 --http 127.0.0.1:7600 --via "$via" \
        --sessions 8 --rate "${RATE:-100}" --duration "${DUR:-15}"
done
