#!/usr/bin/env bash
# Reproduces the wrk numbers of the README's performance section on this machine:
# /healthz, authenticated GET /payments/{id}, POST /payments with fresh keys (--sync full and
# normal), all-replays, and POST /payments through nginx. Loopback only; ~1 minute.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
# Where cargo put it: CARGO_TARGET_DIR, a target-dir in a cargo config, or ./target.
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -E 's/.*"target_directory":"([^"]*)".*/\1/')
bin="$target_dir/release/paytrace"
[ -x "$bin" ] || { echo "no $bin after cargo build --release" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
dur=${DURATION:-8s}

serve() { # serve PORT SYNC
  $bin serve --addr "127.0.0.1:$1" --db "$tmp/$1.db" --sync "$2" --rate-limit 1000000/s --queue 512 \
    2>"$tmp/$1.log" &
  for _ in $(seq 100); do grep -q "listening on" "$tmp/$1.log" && return; sleep 0.1; done
  echo "serve on $1 did not start" >&2; exit 1
}
rps() { grep -E "Requests/sec" | awk '{print $2}'; }
pay() { curl -s -X POST "localhost:$1/payments" -H 'Authorization: Bearer sk_test_paytrace' \
  -H 'Content-Type: application/json' -H "Idempotency-Key: $2" -d '{"amount":1999,"currency":"usd","source":"tok_visa"}'; }

serve 18081 full
id=$(pay 18081 wrk-fixed | sed -E 's/.*"id":"([^"]+)".*/\1/')
cat > "$tmp/get.lua" <<LUA
wrk.headers["Authorization"] = "Bearer sk_test_paytrace"
LUA
cat > "$tmp/replay.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"amount":1999,"currency":"usd","source":"tok_visa"}'
wrk.headers["Authorization"] = "Bearer sk_test_paytrace"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "wrk-fixed"
LUA
echo "GET /healthz:                   $(wrk -t2 -c32 -d"$dur" http://127.0.0.1:18081/healthz | rps)"
echo "GET /payments/{id} (auth+db):   $(wrk -t2 -c32 -d"$dur" -s "$tmp/get.lua" "http://127.0.0.1:18081/payments/$id" | rps)"
echo "POST /payments, --sync full:    $(wrk -t2 -c32 -d"$dur" -s data/wrk/payments.lua http://127.0.0.1:18081 | rps)"
echo "POST /payments, all replays:    $(wrk -t2 -c32 -d"$dur" -s "$tmp/replay.lua" http://127.0.0.1:18081/payments | rps)"

serve 18082 normal
echo "POST /payments, --sync normal:  $(wrk -t2 -c32 -d"$dur" -s data/wrk/payments.lua http://127.0.0.1:18082 | rps)"

if command -v nginx >/dev/null; then
  mkdir -p "$tmp/nginx/logs" "$tmp/nginx/temp"
  sed -e 's/listen 127.0.0.1:8000;/listen 127.0.0.1:18000;/' \
      -e 's/server 127.0.0.1:8080 max_fails=0;/server 127.0.0.1:18082 max_fails=0;/' \
      data/nginx/paytrace.conf > "$tmp/nginx/nginx.conf"
  nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -g 'daemon off; master_process off;' 2>/dev/null &
  timeout 10 bash -c 'until curl -sf 127.0.0.1:18000/healthz >/dev/null; do sleep 0.1; done' \
    || { echo "nginx on 18000 did not start" >&2; exit 1; }
  echo "POST /payments via nginx:       $(wrk -t2 -c32 -d"$dur" -s data/wrk/payments.lua http://127.0.0.1:18000 | rps)"
fi
