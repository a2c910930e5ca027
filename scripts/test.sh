#!/usr/bin/env bash
# The test suite: set-up, data fetch, then pytest (fast tests; `scripts/test.sh -m slow` for the rest).
source "$(dirname "$0")/setup.sh"
zoo data fetch mnist
export ZOO_REQUIRE_MNIST=1
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
