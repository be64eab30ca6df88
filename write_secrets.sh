#!/usr/bin/env bash
# write_secrets.sh - load two enclave apps' secrets into Vault/OpenBao and make per-app tokens.
#
# Usage: ./write_secrets.sh [--policy FILE] [--init-file FILE] [--kv-version 1|2]
#                           [--auth token|approle] [--creds-dir DIR]
#                           [--token-ttl TTL] [--token-max-ttl TTL] [--overwrite] [-h|--help]
#
# Talks to the server at $VAULT_ADDR (default http://127.0.0.1:8200) with the first CLI found of:
# $BAO_BIN, `vault` on PATH, `bao` on PATH. $VAULT_CACERT is honoured for https.
#
# Authentication:
#   - $VAULT_TOKEN set: used as is (it needs rights to mount engines, write policies and secrets,
#     and create tokens; -orphan tokens need root or sudo, otherwise child tokens are made).
#   - otherwise, a fresh server is initialised (1 key share) and the init output - unseal key and
#     root token - is saved to the init file (default ./vault_init.json, mode 0600). Keep it safe and
#     offline: without it a restarted server cannot be unsealed. An existing init file is reused
#     (to unseal and authenticate) and never overwritten.
#
# What it writes, for app N in 1 2:
#   - KV mount occlum/N (kv v1 by default like the original; --kv-version 2 or KV_VERSION=2)
#   - occlum/N/image_key   key=<16 random bytes as dash-separated hex, `occlum gen-image-key` format>
#   - occlum/N/rsa_prikey  key=<RSA 3072 private key, PEM>
#   - occlum/N/rsa_pubkey  key=<its public key, PEM>
#     (existing secrets are kept unless --overwrite: rotating an image key locks you out of images
#      encrypted with it)
#   - policy appN_policy: read-only on occlum/N/* and nothing else
#   - --auth token (the default, as the original): a token with that policy only (orphan, so
#     revoking the root token does not revoke it; TTL from --token-ttl / TOKEN_TTL, else the
#     server's default). The server uses it as is and cannot renew or replace it.
#   - --auth approle: the approle auth method (enabled at approle/ if absent), a role appN whose
#     tokens carry only appN_policy (token_ttl from --token-ttl, default 1h; token_max_ttl from
#     --token-max-ttl, default 24h), and its role_id and a new secret_id written to
#     DIR/appN_role_id and DIR/appN_secret_id, mode 0600 (DIR: --creds-dir, default the policy
#     file's directory with --policy, else ./approle). The server logs in with them, renews its
#     token at half its TTL and logs in again when it must.
#
# Output: with --auth token the app tokens are printed on stdout as APPN_TOKEN=<token> because you
# need them for the policy file; with --auth approle the credential file names are printed as
# APPN_ROLE_ID_FILE=... and APPN_SECRET_ID_FILE=... (the secret_id itself never is). --policy FILE
# writes them into the app_list entries with id 1 and 2 ("app_token", or an "auth" object naming the
# files), and sets "addr" to $VAULT_ADDR (unless "addr" already lists it, e.g. with the other nodes
# of an HA cluster), atomically, the file left mode 0600. Secret values, the
# root token and the unseal key are never printed. Secrets are generated in a private temporary directory and passed to the CLI as files
# (never on a command line, which other users can read in ps), then deleted.
set -euo pipefail

APPS=(1 2)
POLICY_FILE=""
INIT_FILE="${INIT_FILE:-./vault_init.json}"
KV_VERSION="${KV_VERSION:-1}"
TOKEN_TTL="${TOKEN_TTL:-}"
TOKEN_MAX_TTL="${TOKEN_MAX_TTL:-}"
AUTH="${AUTH:-token}"
CREDS_DIR=""
OVERWRITE=0
INITIALISED_HERE=0

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
    echo "write_secrets.sh: $*" >&2
    exit 1
}

info() {
    echo "write_secrets.sh: $*" >&2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --policy) [ $# -ge 2 ] || die "--policy needs a file"; POLICY_FILE="$2"; shift 2 ;;
        --policy=*) POLICY_FILE="${1#*=}"; shift ;;
        --init-file) [ $# -ge 2 ] || die "--init-file needs a file"; INIT_FILE="$2"; shift 2 ;;
        --init-file=*) INIT_FILE="${1#*=}"; shift ;;
        --kv-version) [ $# -ge 2 ] || die "--kv-version needs 1 or 2"; KV_VERSION="$2"; shift 2 ;;
        --kv-version=*) KV_VERSION="${1#*=}"; shift ;;
        --token-ttl) [ $# -ge 2 ] || die "--token-ttl needs a duration"; TOKEN_TTL="$2"; shift 2 ;;
        --token-ttl=*) TOKEN_TTL="${1#*=}"; shift ;;
        --token-max-ttl) [ $# -ge 2 ] || die "--token-max-ttl needs a duration"; TOKEN_MAX_TTL="$2"; shift 2 ;;
        --token-max-ttl=*) TOKEN_MAX_TTL="${1#*=}"; shift ;;
        --auth) [ $# -ge 2 ] || die "--auth needs token or approle"; AUTH="$2"; shift 2 ;;
        --auth=*) AUTH="${1#*=}"; shift ;;
        --creds-dir) [ $# -ge 2 ] || die "--creds-dir needs a directory"; CREDS_DIR="$2"; shift 2 ;;
        --creds-dir=*) CREDS_DIR="${1#*=}"; shift ;;
        --overwrite) OVERWRITE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done

case "$KV_VERSION" in
    1 | 2) ;;
    *) die "KV version must be 1 or 2, not '$KV_VERSION'" ;;
esac
case "$AUTH" in
    token | approle) ;;
    *) die "--auth must be token or approle, not '$AUTH'" ;;
esac
if [ "$AUTH" = approle ] && [ -z "$CREDS_DIR" ]; then
    if [ -n "$POLICY_FILE" ]; then
        CREDS_DIR="$(dirname "$POLICY_FILE")"
    else
        CREDS_DIR="./approle"
    fi
fi

# The CLI: $BAO_BIN, else vault, else bao. Both read VAULT_* (bao also BAO_*); set both.
if [ -n "${BAO_BIN:-}" ]; then
    CLI="$BAO_BIN"
elif command -v vault >/dev/null 2>&1; then
    CLI="$(command -v vault)"
elif command -v bao >/dev/null 2>&1; then
    CLI="$(command -v bao)"
else
    die "neither vault nor bao found on PATH (or set BAO_BIN)"
fi
[ -x "$CLI" ] || die "CLI '$CLI' is not executable"
for tool in python3 openssl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done

export VAULT_ADDR="${VAULT_ADDR:-http://127.0.0.1:8200}"
export BAO_ADDR="$VAULT_ADDR"
if [ -n "${VAULT_CACERT:-}" ]; then
    export BAO_CACERT="$VAULT_CACERT"
fi

cli() {
    "$CLI" "$@"
}

# json_field FILE KEY [INDEX]: print one field of a JSON document (value stays inside this process tree).
json_field() {
    python3 - "$@" <<'PY'
import json, sys
with open(sys.argv[1]) as f:
    value = json.load(f)[sys.argv[2]]
if len(sys.argv) > 3:
    value = value[int(sys.argv[3])]
print(json.dumps(value) if isinstance(value, bool) else value)
PY
}

# policy_tool check|fill FILE APP...: check that FILE has an app_list entry per app (before anything
# is created), or fill in "addr" from $VAULT_ADDR (kept when it already lists it) and each app's credentials - app_token from
# $ASPS_APP<id>_TOKEN, or (with $ASPS_AUTH=approle) an "auth" object naming the files in
# $ASPS_APP<id>_ROLE_ID_FILE / _SECRET_ID_FILE - atomically, leaving mode 0600.
policy_tool() {
    python3 - "$@" <<'PY'
import json, os, stat, sys, tempfile

mode_arg, path, apps = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
except (OSError, ValueError) as exc:
    sys.exit(f"write_secrets.sh: cannot read policy file {path}: {exc}")
entries = doc.get("app_list") if isinstance(doc, dict) else None
if not isinstance(entries, list):
    sys.exit(f"write_secrets.sh: {path} has no app_list")
filled = set()
directory = os.path.dirname(os.path.abspath(path))


def near(name):
    """A credential file's name relative to the policy file (how the server resolves it) when inside."""
    rel = os.path.relpath(os.path.abspath(name), directory)
    return os.path.abspath(name) if rel.startswith("..") else rel


approle = os.environ.get("ASPS_AUTH") == "approle"
if mode_arg == "fill":
    # The address this script talked to, unless the policy already lists it (an HA cluster's nodes).
    vault_addr = os.environ["VAULT_ADDR"].strip().rstrip("/")
    listed = doc.get("addr")
    listed = listed.split(",") if isinstance(listed, str) else listed if isinstance(listed, list) else []
    if vault_addr not in [str(a).strip().rstrip("/") for a in listed]:
        doc["addr"] = vault_addr
    if approle:
        doc["auth_method"] = "approle"
    elif doc.get("auth_method") not in (None, "token"):
        doc["auth_method"] = "token"
for entry in entries:
    if isinstance(entry, dict) and str(entry.get("id")) in apps:
        if mode_arg == "fill" and approle:
            entry.pop("app_token", None)
            entry["auth"] = {
                "method": "approle",
                "role_id_file": near(os.environ[f"ASPS_APP{entry['id']}_ROLE_ID_FILE"]),
                "secret_id_file": near(os.environ[f"ASPS_APP{entry['id']}_SECRET_ID_FILE"]),
            }
        elif mode_arg == "fill":
            entry.pop("auth", None)
            entry["app_token"] = os.environ[f"ASPS_APP{entry['id']}_TOKEN"]
        filled.add(str(entry["id"]))
missing = [a for a in apps if a not in filled]
if missing:
    sys.exit(f"write_secrets.sh: {path}: no app_list entry with id {', '.join(missing)}")
if mode_arg == "check":
    if not os.access(path, os.W_OK) or not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        sys.exit(f"write_secrets.sh: {path} (or its directory) is not writable")
    sys.exit(0)
mode = stat.S_IMODE(os.stat(path).st_mode) & 0o600 or 0o600
fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
try:
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(doc, out, indent=4)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
except BaseException:
    os.unlink(tmp)
    raise
dfd = os.open(directory, os.O_RDONLY)
try:
    os.fsync(dfd)
finally:
    os.close(dfd)
PY
}

if [ -n "$POLICY_FILE" ]; then
    [ -f "$POLICY_FILE" ] || die "policy file '$POLICY_FILE' not found"
    policy_tool check "$POLICY_FILE" "${APPS[@]}"
fi

umask 077
WORK="$(mktemp -d "${TMPDIR:-/tmp}/write_secrets.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- server state: init, unseal, token
STATUS="$WORK/status.json"
status_rc=0
cli status -format=json >"$STATUS" 2>"$WORK/status.err" || status_rc=$?
if [ "$status_rc" -eq 1 ] || [ ! -s "$STATUS" ]; then
    cat "$WORK/status.err" >&2
    die "cannot reach a Vault/OpenBao server at $VAULT_ADDR"
fi
initialized="$(json_field "$STATUS" initialized)"
sealed="$(json_field "$STATUS" sealed)"

if [ "$initialized" != "true" ]; then
    if [ -s "$INIT_FILE" ] || [ -L "$INIT_FILE" ]; then
        die "server at $VAULT_ADDR is not initialised but $INIT_FILE exists; refusing to overwrite it"
    fi
    info "initialising $VAULT_ADDR (1 key share); init output saved to $INIT_FILE (mode 0600)"
    cli operator init -key-shares=1 -key-threshold=1 -format=json >"$WORK/init.json"
    cp "$WORK/init.json" "$INIT_FILE"
    chmod 600 "$INIT_FILE"
    sealed=true
    INITIALISED_HERE=1
fi

if [ "$sealed" = "true" ]; then
    [ -s "$INIT_FILE" ] || die "server at $VAULT_ADDR is sealed and there is no init file ($INIT_FILE) to unseal it"
    info "unsealing $VAULT_ADDR with the key in $INIT_FILE"
    json_field "$INIT_FILE" unseal_keys_b64 0 | tr -d '\n' >"$WORK/unseal_key"
    cli write -format=json sys/unseal key=@"$WORK/unseal_key" >/dev/null
    rm -f "$WORK/unseal_key"
fi

if [ -z "${VAULT_TOKEN:-}" ]; then
    [ -s "$INIT_FILE" ] || die "set VAULT_TOKEN: the server is already initialised and $INIT_FILE does not exist"
    VAULT_TOKEN="$(json_field "$INIT_FILE" root_token)"
fi
export VAULT_TOKEN
export BAO_TOKEN="$VAULT_TOKEN"

# After unsealing (raft) the node needs a moment to become active; wait until it serves requests.
ready=0
for _ in $(seq 1 150); do
    if cli secrets list -format=json >"$WORK/mounts.json" 2>"$WORK/mounts.err"; then
        ready=1
        break
    fi
    if grep -qiE 'permission denied|invalid token' "$WORK/mounts.err"; then
        die "the token is not accepted by $VAULT_ADDR (permission denied listing secrets engines)"
    fi
    sleep 0.2
done
[ "$ready" = 1 ] || { cat "$WORK/mounts.err" >&2; die "server at $VAULT_ADDR did not become ready"; }

# ---------------------------------------------------------------- secrets
mount_version() { # mount_version MOUNT -> "", 1 or 2
    python3 - "$WORK/mounts.json" "$1/" <<'PY'
import json, sys
mounts = json.load(open(sys.argv[1]))
entry = mounts.get(sys.argv[2])
if entry is not None:
    if entry.get("type") not in ("kv", "generic"):
        sys.exit(f"{sys.argv[2]} is mounted as {entry.get('type')}, not kv")
    print((entry.get("options") or {}).get("version") or "1")
PY
}

new_image_key() { # new_image_key FILE: 16 random bytes as "xx-xx-...-xx" (no newline)
    if command -v occlum >/dev/null 2>&1; then
        occlum gen-image-key "$WORK/occlum_image_key" >/dev/null
        tr -d '\n' <"$WORK/occlum_image_key" >"$1"
        rm -f "$WORK/occlum_image_key"
    else
        openssl rand -hex 16 | sed 's/../&-/g; s/-$//' | tr -d '\n' >"$1"
    fi
}

exists() { # exists PATH: PATH holds a secret with a "key" field (its value goes to /dev/null)
    cli kv get -field=key "$1" >/dev/null 2>&1
}

put_secret() { # put_secret PATH FILE: write key=@FILE (the value never appears on a command line)
    cli kv put "$1" key=@"$2" >/dev/null
    info "wrote $1"
}

for app in "${APPS[@]}"; do
    mount="occlum/$app"
    have="$(mount_version "$mount")"
    if [ -z "$have" ]; then
        cli secrets enable -path="$mount" -version="$KV_VERSION" kv >/dev/null
        info "enabled kv v$KV_VERSION at $mount/"
    elif [ "$have" != "$KV_VERSION" ]; then
        info "$mount/ already exists as kv v$have (not v$KV_VERSION); using it as it is"
    fi

    if [ "$OVERWRITE" != 1 ] && exists "$mount/image_key"; then
        info "$mount/image_key exists, kept (--overwrite replaces it)"
    else
        new_image_key "$WORK/image_key"
        put_secret "$mount/image_key" "$WORK/image_key"
        rm -f "$WORK/image_key"
    fi

    # The key pair is one unit: both halves are replaced together or kept together.
    if [ "$OVERWRITE" != 1 ] && exists "$mount/rsa_prikey" && exists "$mount/rsa_pubkey"; then
        info "$mount/rsa_prikey and rsa_pubkey exist, kept (--overwrite replaces them)"
    else
        openssl genrsa -out "$WORK/rsa_prikey" 3072 2>/dev/null
        openssl rsa -in "$WORK/rsa_prikey" -pubout -out "$WORK/rsa_pubkey" 2>/dev/null
        put_secret "$mount/rsa_prikey" "$WORK/rsa_prikey"
        put_secret "$mount/rsa_pubkey" "$WORK/rsa_pubkey"
        rm -f "$WORK/rsa_prikey" "$WORK/rsa_pubkey"
    fi
done

# ---------------------------------------------------------------- per-app policies and tokens
declare -A TOKENS=()
for app in "${APPS[@]}"; do
    # "occlum/N/*" covers KV v1 paths and KV v2's occlum/N/data/... alike; nothing outside occlum/N/.
    cli policy write "app${app}_policy" - >/dev/null <<EOF
# ASPS app $app: read-only access to its own secrets under occlum/$app/, nothing else.
path "occlum/$app/*" {
  capabilities = ["read"]
}
EOF
    if [ "$AUTH" = approle ]; then
        continue
    fi
    args=(token create -policy="app${app}_policy" -display-name="asps-app${app}" -field=token)
    if [ -n "$TOKEN_TTL" ]; then
        args+=(-ttl="$TOKEN_TTL")
    fi
    if ! cli "${args[@]}" -orphan >"$WORK/token" 2>"$WORK/token.err"; then
        info "cannot create an orphan token (needs root/sudo); creating a child of the current token"
        cli "${args[@]}" >"$WORK/token"
    fi
    TOKENS[$app]="$(tr -d '\n' <"$WORK/token")"
    rm -f "$WORK/token"
    [ -n "${TOKENS[$app]}" ] || die "no token created for app $app"
done

# ---------------------------------------------------------------- AppRole credentials
if [ "$AUTH" = approle ]; then
    # Read the whole list first: under pipefail, `cli ... | grep -q` fails whenever grep stops reading
    # before the CLI has written everything (SIGPIPE), and approle would be "enabled" a second time.
    auth_methods="$(cli auth list -format=json)"
    if ! grep -qF '"approle/"' <<<"$auth_methods"; then
        cli auth enable approle >/dev/null
        info "enabled the approle auth method at approle/"
    fi
    mkdir -p "$CREDS_DIR"
    # Ours and closed to others: in a directory others may write, they could plant a file or a link where
    # a secret_id is about to be written, and read it (or every later one) from there.
    [ ! -L "$CREDS_DIR" ] || die "--creds-dir $CREDS_DIR is a symbolic link; name the directory itself"
    [ "$(stat -c %u "$CREDS_DIR")" = "$(id -u)" ] || die "--creds-dir $CREDS_DIR belongs to another user"
    (((8#$(stat -c %a "$CREDS_DIR") & 8#022) == 0)) ||
        die "--creds-dir $CREDS_DIR is writable by its group or by others (chmod go-w it, or name another)"
    for app in "${APPS[@]}"; do
        # A role whose tokens carry only the app's read-only policy; the server renews and logs in again.
        cli write auth/approle/role/"app${app}" token_policies="app${app}_policy" \
            token_ttl="${TOKEN_TTL:-1h}" token_max_ttl="${TOKEN_MAX_TTL:-24h}" >/dev/null
        role_id_file="$CREDS_DIR/app${app}_role_id"
        secret_id_file="$CREDS_DIR/app${app}_secret_id"
        # Written to new temp files (mktemp: created 0600, never an existing file or link) and renamed
        # into place, so a failure leaves the old ones intact.
        role_tmp="$(mktemp "$CREDS_DIR/.app${app}_role_id.XXXXXX")"
        secret_tmp="$(mktemp "$CREDS_DIR/.app${app}_secret_id.XXXXXX")"
        cli read -field=role_id auth/approle/role/"app${app}"/role-id >"$role_tmp"
        cli write -f -field=secret_id auth/approle/role/"app${app}"/secret-id >"$secret_tmp"
        chmod 600 "$role_tmp" "$secret_tmp"
        mv -f "$role_tmp" "$role_id_file"
        mv -f "$secret_tmp" "$secret_id_file"
        if [ ! -s "$role_id_file" ] || [ ! -s "$secret_id_file" ]; then
            die "no AppRole credentials made for app $app"
        fi
        export "ASPS_APP${app}_ROLE_ID_FILE=$role_id_file" "ASPS_APP${app}_SECRET_ID_FILE=$secret_id_file"
        info "AppRole app${app}: role_id and a new secret_id written to $CREDS_DIR (mode 0600)"
    done
fi

# ---------------------------------------------------------------- policy file
if [ -n "$POLICY_FILE" ]; then
    if [ "$AUTH" = token ]; then
        for app in "${APPS[@]}"; do
            export "ASPS_APP${app}_TOKEN=${TOKENS[$app]}"
        done
    fi
    ASPS_AUTH="$AUTH" policy_tool fill "$POLICY_FILE" "${APPS[@]}"
    info "filled addr and the $AUTH credentials of apps ${APPS[*]} into $POLICY_FILE (mode 0600)"
fi

if [ "$INITIALISED_HERE" = 1 ]; then
    info "the root token and unseal key are in $INIT_FILE: move it offline; revoke the root token when done"
fi
if [ "$AUTH" = approle ]; then
    for app in "${APPS[@]}"; do
        echo "APP${app}_ROLE_ID_FILE=$CREDS_DIR/app${app}_role_id"
        echo "APP${app}_SECRET_ID_FILE=$CREDS_DIR/app${app}_secret_id"
    done
    exit 0
fi
info "app tokens follow: they are printed because the policy file needs them; each reads only its app's secrets"
for app in "${APPS[@]}"; do
    echo "APP${app}_TOKEN=${TOKENS[$app]}"
done
