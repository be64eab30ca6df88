#!/usr/bin/env bash
# ASPS — one entry point for users, developers and CI.
#   ./run.sh demo      fresh clone -> venv, sim platform, certificates, server, client, secret printed
#   ./run.sh test      venv from the requirements, then pytest and ruff
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

# Create or update .venv so that it matches the requirements files (a stamp holds their hash).
ensure_venv() {
    local want="${1:-requirements.txt}"
    local stamp="$VENV/.asps-requirements"
    local hash
    hash="$(cat requirements.txt "$want" | sha256sum | cut -d' ' -f1) $want"
    if [ ! -x "$PY" ]; then
        echo "run.sh: creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || ! grep -qxF "$hash" "$stamp"; then
        echo "run.sh: installing $want into $VENV" >&2
        "$PY" -m pip install --quiet --disable-pip-version-check -r "$want"
        echo "$hash" >>"$stamp"
    fi
}

cmd_test() {
    ensure_venv requirements-dev.txt
    "$PY" -m ruff check .
    "$PY" -m pytest "$@"
}

usage() {
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd="${1:-help}"
    shift || true
    case "$cmd" in
        test) cmd_test "$@" ;;
        help | -h | --help) usage ;;
        *) echo "run.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
    esac
}

main "$@"
