#!/usr/bin/env bash
# The whole test suite: builds the sluice binary (the compat tests start it),
# then runs every test of the workspace. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
# Partition tests put nodes in network namespaces: they need iproute2 (and root).
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y --no-install-recommends iproute2 >/dev/null || { apt-get update >/dev/null && apt-get install -y --no-install-recommends iproute2 >/dev/null; }
fi
# The metrics test checks the scrape with promtool (Debian package prometheus).
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; } || echo "promtool unavailable: the metrics test skips its promtool check"
fi
# One build of every target the tests use (the sluice binary included), with
# the features `cargo test --workspace` unifies (dev-dependencies turn some
# on, e.g. cluster's `sim`), so the test run below reuses it instead of
# building the workspace a second time. CI builds from clean once: skip the
# incremental caches, which would only take disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo build --locked --workspace --bins --tests --examples
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast "$@"
else
  cargo test --locked --workspace --no-fail-fast "$@"
fi
