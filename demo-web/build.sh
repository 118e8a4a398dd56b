#!/usr/bin/env bash
# Builds the demo into demo-web/dist/: the client-wasm package (cargo → wasm-bindgen → wasm-opt →
# tsc, the same steps as client-wasm/test.sh) and the app (tsc + static files). Prints how to
# serve it. Installs nothing unless a tool is missing (SKIP_INSTALL=1 skips the checks).
#
#   demo-web/build.sh
#   CARGO_TARGET_DIR=/somewhere demo-web/build.sh
#   ACCORD_WASM=/path/to/accord_client_wasm.wasm demo-web/build.sh   # reuse a cargo-built wasm
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CW="$REPO/client-wasm"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
WASM_BINDGEN_VERSION=0.2.130

if [ -z "${SKIP_INSTALL:-}" ]; then
  rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
  if ! command -v wasm-bindgen >/dev/null || [ "$(wasm-bindgen --version | awk '{print $2}')" != "$WASM_BINDGEN_VERSION" ]; then
    cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" # no --locked: see client-wasm/test.sh
  fi
  [ -x "$CW/node_modules/.bin/tsc" ] || (cd "$CW" && npm ci --no-audit --no-fund)
  [ -x "$HERE/node_modules/.bin/tsc" ] || (cd "$HERE" && npm ci --no-audit --no-fund)
fi

RAW="${ACCORD_WASM:-$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/accord_client_wasm.wasm}"
if [ -z "${ACCORD_WASM:-}" ]; then
  echo "== client-wasm: cargo build (release, wasm32)"
  (cd "$CW" && cargo build --release --target wasm32-unknown-unknown)
fi

# The package is assembled in demo-web/target/client-wasm/{ts,pkg,dist} (client-wasm/ itself is
# left untouched), then copied to dist/vendor/accord/{pkg,dist}.
STAGE="$HERE/target/client-wasm"
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r "$CW/ts" "$CW/tsconfig.json" "$STAGE/"
echo "== client-wasm: wasm-bindgen + wasm-opt"
wasm-bindgen --target web --out-name accord_client_wasm --out-dir "$STAGE/pkg" "$RAW"
WASM="$STAGE/pkg/accord_client_wasm_bg.wasm"
"$CW/node_modules/.bin/wasm-opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
  --enable-sign-ext --enable-mutable-globals --enable-reference-types --enable-multivalue \
  "$WASM" -o "$WASM.opt"
mv "$WASM.opt" "$WASM"
echo "== client-wasm: tsc"
(cd "$STAGE" && "$CW/node_modules/.bin/tsc" -p tsconfig.json)

OUT="$HERE/dist"
rm -rf "$OUT"
mkdir -p "$OUT/vendor/accord"
cp -r "$STAGE/pkg" "$STAGE/dist" "$OUT/vendor/accord/"

echo "== demo: tsc + static files"
(cd "$HERE" && ./node_modules/.bin/tsc -p tsconfig.json)
cp "$HERE/src/index.html" "$HERE/src/style.css" "$OUT/"
cp "$REPO/sync-server/examples/trip.schema.json" "$OUT/trip.schema.json"

echo "demo built in $OUT ($(du -sh "$OUT" | cut -f1); wasm $(stat -c %s "$WASM") bytes)"
echo "run it with:"
echo "  cargo run -p accord-server -- serve --no-auth --schema sync-server/examples/trip.schema.json --demo-dir demo-web/dist"
echo "then open http://127.0.0.1:8787/"
