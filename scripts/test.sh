#!/usr/bin/env bash
# Install what the tests need, then run the whole suite, slow tests included.
#
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` to skip the
# end-to-end tests or `scripts/test.sh tests/test_e2e_docker.py -x`.
# Environment: SECUREVOL_TEST_TIMEOUT bounds the whole run (a duration for
# timeout(1), default 40m), so that a hung mount cannot hold CI until its own limit.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

"$repo/scripts/setup.sh"
cd "$repo"

# SIGINT lets pytest run its fixture teardown (stop dockerd, unmount, remove
# the plugin socket) and print its summary before it exits. The slowest tests
# are listed, so that a run creeping towards CI's limit shows where.
# pytest runs tests/ unless the arguments name test files or test IDs themselves.
targets=(tests)
for arg in "$@"; do
    if [[ $arg != -* && ( -e ${arg%%::*} ) ]]; then
        targets=()
        break
    fi
done

status=0
timeout --foreground --signal=INT --kill-after=120 "${SECUREVOL_TEST_TIMEOUT:-40m}" \
    .venv/bin/pytest --durations=15 "${targets[@]}" "$@" || status=$?

case $status in
    5)
        echo "test.sh: pytest collected no tests, which counts as a failure." >&2
        exit 1
        ;;
    124)
        echo "test.sh: the test run timed out after ${SECUREVOL_TEST_TIMEOUT:-40m}." >&2
        exit 1
        ;;
esac
exit "$status"
