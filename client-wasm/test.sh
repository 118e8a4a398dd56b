#!/usr/bin/env bash
# Builds accord-client-wasm and runs its browser tests (headless Debian Chromium, playwright-core,
# a real accord-server). Installs what it needs on a fresh machine. Exits non-zero on failure.
#
#   client-wasm/test.sh            # everything
#   SKIP_INSTALL=1 client-wasm/test.sh   # skip the apt/rustup/cargo-install/npm checks
#   ACCORD_SERVER=/path/to/accord-server client-wasm/test.sh   # use a built server binary
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HERE/target}"
WASM_BINDGEN_VERSION=0.2.130
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export CHROMIUM
start=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" $(( $(date +%s) - start )); }

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ -z "${SKIP_INSTALL:-}" ]; then
  step "toolchain"
  rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
  if ! command -v wasm-bindgen >/dev/null || [ "$(wasm-bindgen --version | awk '{print $2}')" != "$WASM_BINDGEN_VERSION" ]; then
    # Without --locked: the registry here may lack a locked dependency's exact version.
    cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
  fi
  if [ ! -x "$CHROMIUM" ]; then
    sudo_ apt-get update
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
  fi
  step "npm ci"
  (cd "$HERE" && npm ci --no-audit --no-fund)
fi

step "build wasm (cargo, release, wasm32-unknown-unknown)"
(cd "$HERE" && cargo build --release --target wasm32-unknown-unknown)
RAW="$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/accord_client_wasm.wasm"

step "wasm-bindgen"
rm -rf "$HERE/pkg"
wasm-bindgen --target web --out-dir "$HERE/pkg" "$RAW"
WASM="$HERE/pkg/accord_client_wasm_bg.wasm"
before_opt=$(stat -c %s "$WASM")
step "wasm-opt -Oz (npm binaryen)"
"$HERE/node_modules/.bin/wasm-opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
  --enable-sign-ext --enable-mutable-globals --enable-reference-types --enable-multivalue \
  "$WASM" -o "$WASM.opt"
mv "$WASM.opt" "$WASM"
after_opt=$(stat -c %s "$WASM")
gz=$(gzip -9 -c "$WASM" | wc -c)
echo "wasm: $before_opt bytes after wasm-bindgen, $after_opt bytes after wasm-opt, $gz bytes gzipped (-9)"

step "TypeScript wrapper"
(cd "$HERE" && rm -rf dist && ./node_modules/.bin/tsc -p tsconfig.json)

if [ -z "${ACCORD_SERVER:-}" ]; then
  # ACCORD_SERVER_SRC: another checkout to build the server from (default: this one).
  step "accord-server"
  (cd "${ACCORD_SERVER_SRC:-$REPO}" && cargo build --locked -p accord-server --bin accord-server)
  export ACCORD_SERVER="$CARGO_TARGET_DIR/debug/accord-server"
fi

step "Rust unit tests of the crate (native)"
(cd "$HERE" && cargo test --lib)

step "browser tests"
(cd "$HERE" && node --test --test-concurrency=1 --test-reporter=spec test/)
step "done"
