#!/usr/bin/env bash
# The compatibility matrix (issue #7): runs the compat-tests `matrix::` tests
# (every client library, the same scenarios, against the real binary; each
# test writes its results to target/compat-matrix/<row>.jsonl), prints the
# matrix and writes it to docs/compatibility.md. The same tests also run in
# ./scripts/test.sh; this script only adds the document.
set -uo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
rm -rf "$target/compat-matrix"
cargo build --locked --bin sluice || exit 1
start=$(date +%s)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked -p sluice-compat-tests --no-fail-fast -E 'test(/^matrix::/)' "$@"
else
  cargo test --locked -p sluice-compat-tests --test it --no-fail-fast -- matrix:: "$@"
fi
status=$?
secs=$(( $(date +%s) - start ))
python3 scripts/compat_matrix_doc.py "$target/compat-matrix" docs/compatibility.md "$secs" || exit 1
exit $status
