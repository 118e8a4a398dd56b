#!/usr/bin/env bash
# Accord against the servers its users would otherwise pick, same machine, same run, same load.
#
#   bench/run.sh --smoke            Accord and the relay floor, small numbers, no peers (CI; < 2 min once
#                                   built); Node, when installed, only for the summary
#   bench/run.sh                    every workload against Accord and every peer (installs the
#                                   peers: y-sweet with cargo into $PEERS_DIR, the Node peers
#                                   with `npm ci` in bench/); prints tables with ratios
#   bench/run.sh --only fanout,idle --servers accord,y-sweet
#
# Workloads: fanout, idle, cold, docs, typists (BENCHMARKS.md, "Accord next to its peers", says
# what each measures; docs runs a second batch of 1,000 documents for the cost of one more).
# This machine's floors come with them: fanout's one writer at 50 changes/s for every server;
# "floor", a server that does no document work, in fanout (accord-loadgen relay-floor: each
# update forwarded as it came) and in cold (bench/yws_floor.py, python3: the first update sent
# back to every sync step 1).
# Every server listens on 127.0.0.1 only and every load is bounded in count and time.
# Environment: PEERS_DIR (default: ../peers next to the repository), CARGO_TARGET_DIR,
# BENCH_OUT (where RESULT lines and logs go; default a new directory under /tmp),
# ACCORD_SERVER_BIN (another accord-server binary to measure, e.g. an experiment),
# ACCORD_LOADGEN_BIN (another accord-loadgen binary; with a target directory shared by several
# checkouts, copy both binaries away after the build so nobody else's build replaces them mid-run),
# FANOUT_RATES, FANOUT_SECONDS, FANOUT_WRITERS (10), IDLE_CONNECTIONS, TYPISTS ("8 32 128":
# real automerge-repo clients in Node), THIN_TYPISTS ("8 32 128": accord-loadgen am-typists).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="$ROOT/bench"
SMOKE=0
ONLY="fanout,idle,cold,docs,typists"
SERVERS="accord,y-sweet,y-websocket-server,hocuspocus,automerge-sync-server,floor"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --only) ONLY="$2"; shift ;;
    --servers) SERVERS="$2"; shift ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
server_wanted() { case ",$SERVERS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# 10,000 client sockets and as many server sockets: raise the descriptor limit if we may.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "open files limit: $(ulimit -n)"

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${BENCH_OUT:-$(mktemp -d /tmp/accord-bench.XXXXXX)}"
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"
echo "logs and RESULT lines: $OUT"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

wait_port() { # port, seconds
  local end=$((SECONDS + ${2:-30}))
  while [ $SECONDS -lt $end ]; do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

if [ "$SMOKE" = 1 ]; then
  # Debug by default: the test command has built those dependencies already.
  PROFILE="${BENCH_PROFILE:-debug}"
  if [ "$PROFILE" = release ]; then
    (cd "$ROOT" && cargo build -q --release -p accord-server -p accord-loadgen)
  else
    (cd "$ROOT" && cargo build -q -p accord-server -p accord-loadgen)
  fi
else
  PROFILE=release
  (cd "$ROOT" && cargo build -q --release -p accord-server -p accord-loadgen)
fi
BIN="$TARGET_DIR/$PROFILE"
LOADGEN="${ACCORD_LOADGEN_BIN:-$BIN/accord-loadgen}"

PORT=18700
# start_server NAME: starts it on a fresh port; sets SERVER_PID, YWS_TARGET (loadgen URL
# template), YWS_PROTO, YJS_URL (y-websocket provider serverUrl, may hold {room}), AM_URL.
start_server() {
  local name="$1"
  PORT=$((PORT + 1))
  local dir="$OUT/data-$name-$PORT"
  mkdir -p "$dir"
  YWS_PROTO=yws
  YJS_URL=""
  AM_URL=""
  case "$name" in
    accord)
      "${ACCORD_SERVER_BIN:-$BIN/accord-server}" serve --no-auth --listen "127.0.0.1:$PORT" --data-dir "$dir" \
        --max-connections 20000 >"$OUT/$name-$PORT.log" 2>&1 &
      YWS_TARGET="ws://127.0.0.1:$PORT/yjs/{room}"
      YJS_URL="ws://127.0.0.1:$PORT/yjs"
      AM_URL="ws://127.0.0.1:$PORT/automerge" ;;
    y-sweet)
      "$PEERS_DIR/bin/y-sweet" serve "$dir" --port "$PORT" --host 127.0.0.1 \
        >"$OUT/$name-$PORT.log" 2>&1 &
      YWS_TARGET="ws://127.0.0.1:$PORT/d/{room}/ws/{room}"
      YJS_URL="ws://127.0.0.1:$PORT/d/{room}/ws" ;;
    y-websocket-server)
      (cd "$BENCH" && PORT=$PORT HOST=127.0.0.1 exec node --import ./node/bind-local.mjs \
        node_modules/@y/websocket-server/src/server.js) >"$OUT/$name-$PORT.log" 2>&1 &
      YWS_TARGET="ws://127.0.0.1:$PORT/{room}"
      YJS_URL="ws://127.0.0.1:$PORT" ;;
    hocuspocus)
      (cd "$BENCH" && PORT=$PORT exec node --import ./node/bind-local.mjs \
        node/hocuspocus-server.mjs) >"$OUT/$name-$PORT.log" 2>&1 &
      YWS_TARGET="ws://127.0.0.1:$PORT"
      YWS_PROTO=hocuspocus ;;
    relay-floor)
      # Not a server: forwards each update as it came to the room's other clients and does
      # nothing else (accord-loadgen relay-floor), so a fan-out load against it is this
      # machine's own floor (sockets, WebSocket frames, wake-ups, the load generator).
      "$LOADGEN" relay-floor --port "$PORT" >"$OUT/$name-$PORT.log" 2>&1 &
      YWS_TARGET="ws://127.0.0.1:$PORT/yjs/{room}" ;;
    floor)
      # Not a server: answers every sync step 1 with the first update it was sent and does
      # nothing else (bench/yws_floor.py), so the cold load against it is the client's own floor.
      python3 "$BENCH/yws_floor.py" "$PORT" >"$OUT/$name-$PORT.log" 2>&1 &
      YJS_URL="ws://127.0.0.1:$PORT/yjs" ;;
    automerge-sync-server)
      (cd "$BENCH" && PORT=$PORT DATA_DIR="$dir" exec node --import ./node/bind-local.mjs \
        node_modules/@automerge/automerge-repo-sync-server/src/index.js) \
        >"$OUT/$name-$PORT.log" 2>&1 &
      AM_URL="ws://127.0.0.1:$PORT" ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_port "$PORT" 60
  sleep 0.5
}
# start_yjs_server NAME: start_server, except that "floor" is the fan-out's floor (relay-floor).
start_yjs_server() {
  if [ "$1" = floor ]; then start_server relay-floor; else start_server "$1"; fi
}
stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}
record() { tee -a "$RESULTS"; }

# ------------------------------------------------------------------------------------- smoke
if [ "$SMOKE" = 1 ]; then
  echo "== smoke: native protocol (embedded server)"
  timeout 120 "$LOADGEN" --smoke
  start_server accord
  echo "== smoke: y-websocket protocol against accord-server /yjs"
  timeout 60 "$LOADGEN" yws-fanout --smoke --target "$YWS_TARGET" --server-pid "$SERVER_PID" \
    --label accord --subscribers 10 --fanout-writers 2 --rates 100,200 --duration 1 | record
  timeout 60 "$LOADGEN" yws-idle --smoke --target "$YWS_TARGET" --server-pid "$SERVER_PID" \
    --label accord --connections 200 --duration 1 | record
  timeout 60 "$LOADGEN" yws-docs --smoke --target "$YWS_TARGET" --server-pid "$SERVER_PID" \
    --label accord --docs 20 --type-interval-ms 200 --duration 2 --batches 2 | record
  echo "== smoke: automerge-repo protocol (thin typists) against accord-server /automerge"
  timeout 60 "$LOADGEN" am-typists --smoke --target "$AM_URL" --server-pid "$SERVER_PID" \
    --label accord --duration 2 | record
  stop_server
  echo "== smoke: the fan-out's floor (accord-loadgen relay-floor)"
  start_server relay-floor
  timeout 60 "$LOADGEN" yws-fanout --smoke --target "$YWS_TARGET" --server-pid "$SERVER_PID" \
    --label floor --subscribers 10 --fanout-writers 2 --rates 100 --duration 1 | record
  stop_server
  grep -q "RESULT fanout accord best_updates_per_s=[1-9]" "$RESULTS" || { echo "smoke: fan-out delivered nothing" >&2; exit 1; }
  grep -q "RESULT fanout floor best_updates_per_s=[1-9]" "$RESULTS" || { echo "smoke: the relay floor delivered nothing" >&2; exit 1; }
  grep -q "RESULT idle accord connections=200" "$RESULTS" || { echo "smoke: idle failed" >&2; exit 1; }
  grep -q "RESULT docs accord docs=20 .*marginal_bytes_per_doc=" "$RESULTS" || { echo "smoke: docs failed" >&2; exit 1; }
  grep -q "RESULT am-typists accord n=4 .*caught_up=true" "$RESULTS" || { echo "smoke: am-typists failed" >&2; exit 1; }
  # The summary's tables and target checks, from what the smoke run printed (Node, where there).
  if command -v node >/dev/null; then
    node "$BENCH/node/summary.mjs" "$RESULTS" > "$OUT/summary.md"
    grep -q "^| 5. idle connection | " "$OUT/summary.md" || { echo "smoke: the summary checked no target" >&2; exit 1; }
  fi
  echo "smoke: ok"
  exit 0
fi

# ------------------------------------------------------------------------------------ peers
PEERS_DIR="${PEERS_DIR:-$(cd "$ROOT/.." && pwd)/peers}"
if server_wanted y-sweet && [ ! -x "$PEERS_DIR/bin/y-sweet" ]; then
  echo "installing y-sweet 0.9.1 into $PEERS_DIR (compiles for several minutes)"
  mkdir -p "$PEERS_DIR"
  CARGO_TARGET_DIR="$PEERS_DIR/target" cargo install y-sweet --version 0.9.1 --locked \
    --root "$PEERS_DIR"
fi
if [ ! -d "$BENCH/node_modules/@y/websocket-server" ] || [ ! -d "$BENCH/node_modules/@automerge/automerge-repo" ]; then
  (cd "$BENCH" && npm ci --no-audit --no-fund)
fi
TRACE="${ACCORD_TRACES:-$ROOT/../shared/data/traces}/automerge-paper.json.gz"

{
  echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sm), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "versions: accord $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'), y-sweet 0.9.1, node $(node --version)"
  (cd "$BENCH" && node -e 'const p=require("./package.json"); for (const k of Object.keys(p.dependencies)) console.log("  " + k + " " + require("./node_modules/" + k + "/package.json").version)')
} | tee "$OUT/machine.txt"

YJS_SERVERS="accord y-sweet y-websocket-server hocuspocus"

if want fanout; then
  RATES="${FANOUT_RATES:-250,500,750,1000,1250,1500,1750,2000,2500,3000,4000,6000,8000,10000,12000,16000,20000}"
  # "floor" last: the same load against a relay that does no document work (label floor).
  for s in $YJS_SERVERS floor; do
    server_wanted "$s" || continue
    echo "== fanout: $s"
    start_yjs_server "$s"
    timeout 900 "$LOADGEN" yws-fanout --target "$YWS_TARGET" --proto "$YWS_PROTO" \
      --server-pid "$SERVER_PID" --label "$s" --subscribers 100 \
      --fanout-writers "${FANOUT_WRITERS:-10}" --rates "$RATES" --duration "${FANOUT_SECONDS:-5}" | record || echo "fanout $s failed" >&2
    stop_server
  done
  # The floor of this machine: one writer at 50 changes a second, each change relayed alone to
  # the same 100 subscribers (RESULT fanout-floor). Target 1's line is a fifth of the best
  # peer's p99, and this is how low a p99 gets here with nothing queued behind a change.
  for s in $YJS_SERVERS floor; do
    server_wanted "$s" || continue
    echo "== fanout floor (1 writer, 50 changes/s): $s"
    start_yjs_server "$s"
    timeout 120 "$LOADGEN" yws-fanout --target "$YWS_TARGET" --proto "$YWS_PROTO" \
      --server-pid "$SERVER_PID" --label "$s" --subscribers 100 --fanout-writers 1 --rates 50 \
      --duration 5 | sed -u 's/^RESULT fanout/RESULT fanout-floor/' | record || echo "fanout floor $s failed" >&2
    stop_server
  done
fi

if want idle; then
  for s in $YJS_SERVERS; do
    server_wanted "$s" || continue
    echo "== idle: $s"
    start_server "$s"
    timeout 300 "$LOADGEN" yws-idle --target "$YWS_TARGET" --proto "$YWS_PROTO" \
      --server-pid "$SERVER_PID" --label "$s" --connections "${IDLE_CONNECTIONS:-10000}" \
      --duration 5 | record || echo "idle $s failed" >&2
    stop_server
  done
fi

if want cold; then
  # "floor" last: the client against a server that does no document work (the line's floor).
  for s in accord y-sweet y-websocket-server floor; do
    server_wanted "$s" || continue
    [ "$s" = floor ] && ! command -v python3 >/dev/null && { echo "no python3: no floor" >&2; continue; }
    echo "== cold load (Yjs): $s"
    start_server "$s"
    (cd "$BENCH/node" && timeout 300 node --expose-gc coldload.mjs --kind yjs --server-url "$YJS_URL" \
      --label "$s" --trace "$TRACE") | record || echo "cold yjs $s failed" >&2
    stop_server
  done
  for s in accord automerge-sync-server; do
    server_wanted "$s" || continue
    echo "== cold load (Automerge): $s"
    start_server "$s"
    (cd "$BENCH/node" && timeout 600 node coldload.mjs --kind automerge --server-url "$AM_URL" \
      --label "$s" --trace "$TRACE") | record || echo "cold automerge $s failed" >&2
    stop_server
  done
fi

if want docs; then
  for s in $YJS_SERVERS; do
    server_wanted "$s" || continue
    echo "== 1,000 documents x 3 clients, then 1,000 more: $s"
    start_server "$s"
    timeout 400 "$LOADGEN" yws-docs --target "$YWS_TARGET" --proto "$YWS_PROTO" \
      --server-pid "$SERVER_PID" --label "$s" --docs 1000 --clients-per-doc 3 \
      --type-interval-ms 2000 --duration 20 --batches 2 | record || echo "docs $s failed" >&2
    stop_server
  done
fi

if want typists; then
  for n in ${TYPISTS:-8 32 128}; do
    for s in accord automerge-sync-server; do
      server_wanted "$s" || continue
      echo "== typists n=$n: $s"
      start_server "$s"
      (cd "$BENCH/node" && timeout 300 node typists.mjs --server-url "$AM_URL" --n "$n" \
        --seconds 20 --server-pid "$SERVER_PID" --label "$s") | record || echo "typists $s failed" >&2
      stop_server
    done
  done
  # The same load from thin clients (accord-loadgen am-typists: the change graph only, no
  # text), so the server, not the clients, is what saturates at 32 and 128 typists.
  for n in ${THIN_TYPISTS:-8 32 128}; do
    for s in accord automerge-sync-server; do
      server_wanted "$s" || continue
      echo "== thin typists n=$n: $s"
      start_server "$s"
      timeout 300 "$LOADGEN" am-typists --target "$AM_URL" --typists "$n" --duration 20 \
        --server-pid "$SERVER_PID" --label "$s" | record || echo "thin typists $s n=$n: lagged" >&2
      stop_server
    done
  done
fi

echo
node "$BENCH/node/summary.mjs" "$RESULTS" "$OUT/machine.txt" | tee "$OUT/summary.md"
