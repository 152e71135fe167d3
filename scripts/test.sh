#!/usr/bin/env bash
# Run every check the project has: install what is missing, then ruff, mypy and pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow` for the soak tests).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: meshagent needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# A real Consul for the integration tests (Debian bullseye's 1.8.7, or MESHAGENT_CONSUL_DEB).
MESHAGENT_CONSUL_BIN="$(bash scripts/install-consul.sh)"
export MESHAGENT_CONSUL_BIN
echo "consul: $MESHAGENT_CONSUL_BIN ($("$MESHAGENT_CONSUL_BIN" version | head -n 1))"

.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
