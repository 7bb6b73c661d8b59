#!/usr/bin/env bash
# Create the Python virtualenv that the third-party test peers run in (tests/peers/*.py):
# the `standardwebhooks` verifier from PyPI. Idempotent: an existing venv with the pinned
# requirements is kept, so only the first run pays (a few seconds).
#
#   HERALD_TOOLS_DIR  cache directory (default: ~/.cache/herald-tools)
#   PYTHON            interpreter to build the venv from (default: python3; on Debian the
#                     python3-venv package provides the venv module)
#
# Layout: $HERALD_TOOLS_DIR/py-venv/bin/python. Prints that interpreter's path on its last
# line of stdout.
set -euo pipefail

# Pinned so that every machine verifies against the same third-party code.
REQUIREMENTS=(standardwebhooks==1.1.0)

TOOLS_DIR="${HERALD_TOOLS_DIR:-$HOME/.cache/herald-tools}"
VENV="$TOOLS_DIR/py-venv"
STAMP="$VENV/.herald-requirements"
PYTHON="${PYTHON:-python3}"

log() { echo "python-peers: $*" >&2; }

want="${REQUIREMENTS[*]}"
if [[ -x $VENV/bin/python && -f $STAMP && "$(cat "$STAMP")" == "$want" ]] &&
  "$VENV/bin/python" -c 'import standardwebhooks' 2>/dev/null; then
  log "up to date: $VENV ($want)"
  echo "$VENV/bin/python"
  exit 0
fi

command -v "$PYTHON" >/dev/null || {
  log "$PYTHON not found: install Python 3 (Debian: apt-get install -y python3 python3-venv)"
  exit 1
}
log "creating $VENV with $want"
mkdir -p "$TOOLS_DIR"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || {
  log "'$PYTHON -m venv' failed (Debian: apt-get install -y python3-venv)"
  rm -rf "$VENV"
  exit 1
}
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${REQUIREMENTS[@]}" || {
  log "pip install failed"
  rm -rf "$VENV"
  exit 1
}
"$VENV/bin/python" -c 'import standardwebhooks'
# Written last: a venv without the stamp is rebuilt on the next run.
echo "$want" >"$STAMP"
log "ready: $VENV"
echo "$VENV/bin/python"
