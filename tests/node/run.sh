#!/usr/bin/env bash
# Runs the Node compatibility tests (real yjs, y-websocket, automerge-repo packages) against a
# built accord-server binary: ACCORD_SERVER_BIN if set, else `cargo build -p accord-server` (a
# no-op when up to date) and target/debug/accord-server under CARGO_TARGET_DIR.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [[ -z "${ACCORD_SERVER_BIN:-}" ]]; then
  target="${CARGO_TARGET_DIR:-$root/target}"
  (cd "$root" && cargo build -p accord-server)
  ACCORD_SERVER_BIN="$target/debug/accord-server"
fi
export ACCORD_SERVER_BIN
cd "$here"
npm ci --no-audit --no-fund --loglevel=error
node --test --test-concurrency=1 test/
