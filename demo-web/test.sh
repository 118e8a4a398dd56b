#!/usr/bin/env bash
# Builds the demo and runs its end-to-end tests: headless Debian Chromium (playwright-core)
# against a real accord-server serving demo-web/dist. Installs what it needs on a fresh machine.
# Prints the folder of the screenshots and how long it took.
#
#   demo-web/test.sh
#   SKIP_INSTALL=1 demo-web/test.sh        # skip the apt/rustup/cargo-install/npm checks
#   ACCORD_SERVER=/path/to/accord-server demo-web/test.sh
#   SCREENSHOTS=/some/dir demo-web/test.sh # default demo-web/screenshots
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export CHROMIUM
export SCREENSHOTS="${SCREENSHOTS:-$HERE/screenshots}"
start=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" $(( $(date +%s) - start )); }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ -z "${SKIP_INSTALL:-}" ]; then
  step "toolchain"
  if [ ! -x "$CHROMIUM" ]; then
    sudo_ apt-get update
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
  fi
  step "npm ci"
  (cd "$REPO/client-wasm" && npm ci --no-audit --no-fund)
  (cd "$HERE" && npm ci --no-audit --no-fund)
fi

step "build the demo"
"$HERE/build.sh"

if [ -z "${ACCORD_SERVER:-}" ]; then
  step "accord-server"
  (cd "$REPO" && cargo build --locked -p accord-server --bin accord-server)
  export ACCORD_SERVER="$CARGO_TARGET_DIR/debug/accord-server"
fi

step "end-to-end tests"
rm -rf "$SCREENSHOTS"
(cd "$HERE" && node --test --test-concurrency=1 --test-reporter=spec test/)
step "done"
echo "screenshots: $SCREENSHOTS"
