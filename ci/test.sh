#!/usr/bin/env bash
# The test command the README gives: the whole CPU suite (GPU-marked tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -p no:cacheprovider --timeout=900 "$@" tests
