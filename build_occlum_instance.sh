#!/usr/bin/env bash
# Build the ASPS Occlum instances: occlum_instance_client and occlum_instance_server.
#
# Usage: ./build_occlum_instance.sh [all|client|server|policy]
#   all     (default) build the client instance, measure it, write its mr_enclave and
#           mr_signer into the policy for app APP_ID, then build the server instance
#           (which carries that policy)
#   client  build the client instance, measure it and update the policy only
#           (for a server that runs natively, outside Occlum)
#   server  measure the existing client instance, update the policy, build the server
#   policy  measure the existing client instance, update the policy, copy it into the
#           existing server instance and rebuild that instance with `occlum build`
#
# Both instances get a Python runtime the way Occlum's Python demos do it: a conda prefix
# (OCCLUM_PYTHON_DIR) copied to /opt/<its name> by copy_bom, /bin/python3 linked to it and
# PYTHONHOME set in Occlum.json. Create that prefix once, on the host:
#   conda create --prefix ./python-occlum -y python=3.11
#   ./python-occlum/bin/python3 -m pip install -r requirements.txt
#
# Inside the client image: the enclave side only, /bin/{asps_client.py, asps_wire.py, cli_env.py,
# ratls_attest.py, attester.py, dcap_quote.py, asps_pb2*.py, requirements.txt} (exactly what
# `import asps_client` loads: tests/test_layout.py checks it) and /etc/asps/ca.crt (the server CA).
# Inside the server image: the server modules in /bin and /etc/asps/{ca.crt, server.crt,
# server.key, policy_vault.json} with the files the policy names (ca_file, secrets_file).
# Run them with ./run.sh server|client; host files are under /host (the instance directory).
#
# Environment (defaults in brackets):
#   ASPS_SRC_DIR         where the modules are [the directory of this script]
#   CERTS_DIR            ca.crt, server.crt, server.key [ASPS_SRC_DIR/certs]
#   POLICY_FILE          policy edited in place [ASPS_SRC_DIR/policy_vault.json]
#   APP_ID               app of the policy that receives the client's measurement [1]
#   INSTANCE_DIR_PREFIX  instances are PREFIX_client and PREFIX_server [ASPS_SRC_DIR/occlum_instance]
#   OCCLUM_PYTHON_DIR    conda prefix with Python 3.11+ and the requirements [ASPS_SRC_DIR/python-occlum]
#   OCCLUM_TEMPLATE_DIR  holds base.yaml for copy_bom [/opt/occlum/etc/template]
#   OCCLUM_GLIBC_DIR     Occlum's glibc; its NSS/resolver libraries are copied [/opt/occlum/glibc/lib]
#   OCCLUM_BUILD_OPTS    extra `occlum build` options, e.g. "--sign-key my.pem" or "--sgx-mode SIM"
#   OCCLUM_DEBUGGABLE    Occlum.json metadata.debuggable [false]; a debug enclave is refused
#                        by a policy without "allow_debug": true
#   OCCLUM_USER_SPACE_SIZE [640MB]  OCCLUM_KERNEL_HEAP_SIZE [64MB]  OCCLUM_MAX_THREADS [64]
#   MEASURE_WITH         sgx_sign | occlum | auto [auto: sgx_sign when found, else `occlum print`]
#   SGX_SIGN             the sgx_sign tool [sgx_sign on PATH, then the SGX SDK / Occlum copies]
#   ASPS_CLIENT_FILES, ASPS_SERVER_FILES  space-separated file lists overriding the defaults
set -euo pipefail

usage() {
    sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
    echo "build_occlum_instance.sh: error: $*" >&2
    exit 1
}

log() {
    echo "build_occlum_instance.sh: $*" >&2
}

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ASPS_SRC_DIR="${ASPS_SRC_DIR:-$SCRIPT_DIR}"
CERTS_DIR="${CERTS_DIR:-$ASPS_SRC_DIR/certs}"
POLICY_FILE="${POLICY_FILE:-$ASPS_SRC_DIR/policy_vault.json}"
APP_ID="${APP_ID:-1}"
INSTANCE_DIR_PREFIX="${INSTANCE_DIR_PREFIX:-$ASPS_SRC_DIR/occlum_instance}"
OCCLUM_PYTHON_DIR="${OCCLUM_PYTHON_DIR:-$ASPS_SRC_DIR/python-occlum}"
OCCLUM_TEMPLATE_DIR="${OCCLUM_TEMPLATE_DIR:-/opt/occlum/etc/template}"
OCCLUM_GLIBC_DIR="${OCCLUM_GLIBC_DIR:-/opt/occlum/glibc/lib}"
OCCLUM_BUILD_OPTS="${OCCLUM_BUILD_OPTS:-}"
OCCLUM_DEBUGGABLE="${OCCLUM_DEBUGGABLE:-false}"
OCCLUM_USER_SPACE_SIZE="${OCCLUM_USER_SPACE_SIZE:-640MB}"
OCCLUM_KERNEL_HEAP_SIZE="${OCCLUM_KERNEL_HEAP_SIZE:-64MB}"
OCCLUM_MAX_THREADS="${OCCLUM_MAX_THREADS:-64}"
MEASURE_WITH="${MEASURE_WITH:-auto}"
ASPS_CLIENT_FILES="${ASPS_CLIENT_FILES:-asps_client.py asps_wire.py cli_env.py ratls_attest.py attester.py dcap_quote.py asps_pb2.py asps_pb2_grpc.py requirements.txt}"
ASPS_SERVER_FILES="${ASPS_SERVER_FILES:-asps_server.py asps_wire.py cli_env.py ratls.py ratls_attest.py attester.py dcap.py dcap_quote.py dcap_collateral.py x509_chain.py pccs.py ops.py policy.py policy_check.py kms.py asps_pb2.py asps_pb2_grpc.py intel_sgx_root_ca.der requirements.txt}"
# Copied when present: the legacy cczoo stubs.
OPTIONAL_CLIENT_FILES="secretmanager_pb2.py secretmanager_pb2_grpc.py"
OPTIONAL_SERVER_FILES="secretmanager_pb2.py secretmanager_pb2_grpc.py"
# Looked up at run time by glibc (dlopen), so copy_bom's dependency analysis cannot find them.
GLIBC_RUNTIME_LIBS="libnss_files.so.2 libnss_dns.so.2 libresolv.so.2"
SIGNED_SO="build/lib/libocclum-libos.signed.so"
POLICY_REFS=()

# ---------------------------------------------------------------- tools and inputs

find_tool() {
    # find_tool NAME FALLBACK_PATH... -> prints the first executable found
    local name="$1" candidate
    shift
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return 0
    fi
    for candidate in "$@"; do
        if [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

check_tools() {
    OCCLUM="$(find_tool occlum /opt/occlum/build/bin/occlum)" ||
        die "occlum not found: install Occlum (https://occlum.readthedocs.io) or work in the occlum/occlum Docker image"
    COPY_BOM="$(find_tool copy_bom /opt/occlum/build/bin/copy_bom)" ||
        die "copy_bom not found: it ships with Occlum in /opt/occlum/build/bin"
    command -v python3 >/dev/null 2>&1 || die "python3 not found on the host (needed to edit JSON files)"
}

check_measure_tool() {
    SGX_SIGN="${SGX_SIGN:-}"
    if [ -z "$SGX_SIGN" ]; then
        SGX_SIGN="$(find_tool sgx_sign "${SGX_SDK:-/opt/intel/sgxsdk}/bin/x64/sgx_sign" \
            /opt/occlum/sgxsdk-tools/bin/x64/sgx_sign)" || SGX_SIGN=""
    fi
    case "$MEASURE_WITH" in
        auto) if [ -n "$SGX_SIGN" ]; then MEASURE_WITH=sgx_sign; else MEASURE_WITH=occlum; fi ;;
        sgx_sign) [ -n "$SGX_SIGN" ] || die "MEASURE_WITH=sgx_sign but sgx_sign was not found (set SGX_SIGN)" ;;
        occlum) ;;
        *) die "MEASURE_WITH must be sgx_sign, occlum or auto, not '$MEASURE_WITH'" ;;
    esac
}

check_python_runtime() {
    local py="$OCCLUM_PYTHON_DIR/bin/python3"
    [ -d "$OCCLUM_PYTHON_DIR" ] ||
        die "no Python runtime at OCCLUM_PYTHON_DIR=$OCCLUM_PYTHON_DIR; create it with:
    conda create --prefix $OCCLUM_PYTHON_DIR -y python=3.11
    $py -m pip install -r $ASPS_SRC_DIR/requirements.txt"
    [ -x "$py" ] || die "$py is missing or not executable (OCCLUM_PYTHON_DIR must be a conda prefix)"
    # The prefix is a glibc build, so it runs on the host too: check it before packing it.
    local status=0
    "$py" -c 'import sys
if sys.version_info < (3, 11):
    sys.exit(3)
import cryptography, google.protobuf, grpc' >/dev/null 2>&1 || status=$?
    case "$status" in
        0) ;;
        1) die "$py lacks the ASPS requirements; run: $py -m pip install -r $ASPS_SRC_DIR/requirements.txt" ;;
        *) die "$py is not Python 3.11 or newer" ;;
    esac
}

require_files() {
    # require_files DIR FILE... : every FILE must exist in DIR
    local dir="$1" f
    shift
    for f in "$@"; do
        [ -f "$dir/$f" ] || die "missing $dir/$f"
    done
}

# ---------------------------------------------------------------- bom and Occlum.json

yaml_str() {
    # A YAML double-quoted scalar (same escapes as JSON for backslash and quote).
    local s="${1//\\/\\\\}"
    printf '"%s"' "${s//\"/\\\"}"
}

# write_bom KIND FILE : the copy_bom description of the image for KIND (client|server)
write_bom() {
    local kind="$1" out="$2" py_name f list optional
    py_name="$(basename "$OCCLUM_PYTHON_DIR")"
    if [ "$kind" = client ]; then
        list="$ASPS_CLIENT_FILES"
        optional="$OPTIONAL_CLIENT_FILES"
    else
        list="$ASPS_SERVER_FILES"
        optional="$OPTIONAL_SERVER_FILES"
    fi
    {
        echo "# generated by build_occlum_instance.sh for the ASPS $kind"
        echo "includes:"
        echo "  - base.yaml"
        echo "targets:"
        echo "  - target: /bin"
        echo "    createlinks:"
        echo "      - src: $(yaml_str "/opt/$py_name/bin/python3")"
        echo "        linkname: python3"
        echo "  - target: /opt"
        echo "    copy:"
        echo "      - dirs:"
        echo "          - $(yaml_str "$OCCLUM_PYTHON_DIR")"
        echo "  - target: /bin"
        echo "    copy:"
        echo "      - files:"
        for f in $list; do
            echo "          - $(yaml_str "$ASPS_SRC_DIR/$f")"
        done
        for f in $optional; do
            if [ -f "$ASPS_SRC_DIR/$f" ]; then
                echo "          - $(yaml_str "$ASPS_SRC_DIR/$f")"
            fi
        done
        echo "  - target: /etc/asps"
        echo "    copy:"
        echo "      - files:"
        echo "          - $(yaml_str "$CERTS_DIR/ca.crt")"
        if [ "$kind" = server ]; then
            echo "          - $(yaml_str "$CERTS_DIR/server.crt")"
            echo "          - $(yaml_str "$CERTS_DIR/server.key")"
            echo "          - $(yaml_str "$POLICY_FILE")"
            # Files named by the policy keep their place relative to it (absolute: same path).
            local ref
            for ref in "${POLICY_REFS[@]}"; do
                if [[ "$ref" = /* ]]; then
                    echo "  - target: $(yaml_str "$(dirname "$ref")")"
                    echo "    copy:"
                    echo "      - files:"
                    echo "          - $(yaml_str "$ref")"
                else
                    echo "  - target: $(yaml_str "$(dirname "/etc/asps/$ref")")"
                    echo "    copy:"
                    echo "      - files:"
                    echo "          - $(yaml_str "$(dirname "$POLICY_FILE")/$ref")"
                fi
            done
        fi
        local libs=()
        for f in $GLIBC_RUNTIME_LIBS; do
            if [ -f "$OCCLUM_GLIBC_DIR/$f" ]; then
                libs+=("$OCCLUM_GLIBC_DIR/$f")
            fi
        done
        if [ "${#libs[@]}" -gt 0 ]; then
            echo "  - target: $(yaml_str "$OCCLUM_GLIBC_DIR")"
            echo "    copy:"
            echo "      - files:"
            for f in "${libs[@]}"; do
                echo "          - name: $(yaml_str "$f")"
                echo "            autodep: false"
            done
        fi
        if [ -f /etc/nsswitch.conf ]; then
            echo "  - target: /etc"
            echo "    copy:"
            echo "      - files:"
            echo "          - $(yaml_str /etc/nsswitch.conf)"
        fi
    } >"$out"
}

# edit_occlum_json FILE : resource limits for CPython + gRPC, trusted environment, metadata
edit_occlum_json() {
    local py_name
    py_name="$(basename "$OCCLUM_PYTHON_DIR")"
    python3 - "$1" "$py_name" "$OCCLUM_USER_SPACE_SIZE" "$OCCLUM_KERNEL_HEAP_SIZE" \
        "$OCCLUM_MAX_THREADS" "$OCCLUM_DEBUGGABLE" <<'PY'
import json
import os
import sys

path, py_name, user_space, kernel_heap, max_threads, debuggable = sys.argv[1:]
with open(path, encoding="utf-8") as f:
    conf = json.load(f)
limits = conf.setdefault("resource_limits", {})
limits["user_space_size"] = user_space
limits["kernel_space_heap_size"] = kernel_heap
limits["max_num_of_threads"] = int(max_threads)
process = conf.setdefault("process", {})
process["default_heap_size"] = "64MB"
process["default_mmap_size"] = "256MB"
# Trusted environment: measured with the enclave, not taken from the host.
env = conf.setdefault("env", {})
wanted = [f"PYTHONHOME=/opt/{py_name}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"]
names = {w.split("=", 1)[0] for w in wanted}
env["default"] = [e for e in env.get("default", []) if e.split("=", 1)[0] not in names] + wanted
# No host variable may reach the Python process unmeasured (PYTHONPATH, ASPS_* ...).
env["untrusted"] = []
conf.setdefault("metadata", {})["debuggable"] = debuggable == "true"
tmp = f"{path}.tmp"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(conf, f, indent=4)
    f.write("\n")
os.replace(tmp, path)
PY
}

# ---------------------------------------------------------------- build, measure, policy

build_instance() {
    local kind="$1" dir="${INSTANCE_DIR_PREFIX}_$1"
    log "building $dir"
    rm -rf "$dir"
    "$OCCLUM" new "$dir" >&2
    (
        cd "$dir"
        rm -rf image
        write_bom "$kind" "asps_$kind.yaml"
        "$COPY_BOM" -f "asps_$kind.yaml" --root image --include-dir "$OCCLUM_TEMPLATE_DIR" >&2
        [ -d "image/opt/$(basename "$OCCLUM_PYTHON_DIR")" ] ||
            die "copy_bom did not put the Python runtime into $dir/image/opt"
        edit_occlum_json Occlum.json
        occlum_build
    )
}

occlum_build() {
    local opts=()
    # Word splitting is intended: OCCLUM_BUILD_OPTS holds several options.
    read -r -a opts <<<"$OCCLUM_BUILD_OPTS"
    "$OCCLUM" build "${opts[@]}" >&2
}

# measure DIR -> prints "<mr_enclave> <mr_signer>" (lower-case hex)
measure() {
    local dir="$1" mr_enclave mr_signer dump
    [ -f "$dir/$SIGNED_SO" ] || die "$dir/$SIGNED_SO not found: build the client instance first"
    if [ "$MEASURE_WITH" = sgx_sign ]; then
        dump="$(mktemp "${TMPDIR:-/tmp}/asps-sgx-dump.XXXXXX")"
        "$SGX_SIGN" dump -enclave "$dir/$SIGNED_SO" -dumpfile "$dump" >/dev/null ||
            { rm -f "$dump"; die "sgx_sign dump failed for $dir/$SIGNED_SO"; }
        read -r mr_enclave mr_signer < <(parse_dump "$dump") ||
            { rm -f "$dump"; die "cannot read enclave_hash.m and mrsigner->value from the sgx_sign dump"; }
        rm -f "$dump"
    else
        mr_enclave="$(cd "$dir" && "$OCCLUM" print mrenclave)"
        mr_signer="$(cd "$dir" && "$OCCLUM" print mrsigner)"
    fi
    mr_enclave="${mr_enclave,,}"
    mr_signer="${mr_signer,,}"
    [[ "$mr_enclave" =~ ^[0-9a-f]{64}$ ]] ||
        die "bad mr_enclave '$mr_enclave' from $MEASURE_WITH (is sgx_sign on PATH for occlum print?)"
    [[ "$mr_signer" =~ ^[0-9a-f]{64}$ ]] || die "bad mr_signer '$mr_signer' from $MEASURE_WITH"
    echo "$mr_enclave $mr_signer"
}

# parse_dump FILE -> "<mr_enclave> <mr_signer>": the two 16-byte lines after each label
parse_dump() {
    python3 - "$1" <<'PY'
import sys

LABELS = ("metadata->enclave_css.body.enclave_hash.m:", "mrsigner->value:")
with open(sys.argv[1], encoding="ascii", errors="replace") as f:
    lines = [line.strip() for line in f]
values = []
for label in LABELS:
    if label not in lines:
        sys.exit(f"{label} not in the dump")
    at = lines.index(label)
    tokens = " ".join(lines[at + 1 : at + 3]).split()
    data = bytes(int(t, 16) for t in tokens if t.lower().startswith("0x"))
    if len(data) != 32:
        sys.exit(f"{label} has {len(data)} bytes, not 32")
    values.append(data.hex())
print(*values)
PY
}

# update_policy MR_ENCLAVE MR_SIGNER : set them for APP_ID, atomically, keeping everything else.
# update_policy check : only check that the file can be edited (before anything is built) and
# print the files it refers to.
update_policy() {
    [ -f "$POLICY_FILE" ] || die "policy file $POLICY_FILE not found (set POLICY_FILE)"
    python3 - "$POLICY_FILE" "$APP_ID" "$@" <<'PY'
import json
import os
import sys
import tempfile

path, app_id, *values = sys.argv[1:]
try:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    policy = json.loads(text)
except (OSError, ValueError) as exc:
    sys.exit(f"cannot read {path}: {exc}")
# Keep the file's indentation so that the edit shows as two changed lines in a diff.
indented = [line for line in text.splitlines()[1:3] if line.startswith(" ")]
indent = len(indented[0]) - len(indented[0].lstrip(" ")) if indented else 4
apps = policy.get("app_list") if isinstance(policy, dict) else None
if not isinstance(apps, list):
    sys.exit(f"{path}: no app_list")
matches = [a for a in apps if isinstance(a, dict) and str(a.get("id")) == app_id]
if len(matches) != 1:
    sys.exit(f"{path}: expected one app with id {app_id}, found {len(matches)}")
if values == ["check"]:
    # Files the policy names relative to itself (Vault CA, JSON secrets): the server image needs them.
    for key in ("ca_file", "secrets_file"):
        if isinstance(policy.get(key), str) and policy[key]:
            print(policy[key])
    sys.exit(0)
app = matches[0]
app["mr_enclave"], app["mr_signer"] = values
directory = os.path.dirname(os.path.abspath(path))
fd, tmp = tempfile.mkstemp(prefix=".policy-", dir=directory)
try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(policy, f, indent=indent, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, os.stat(path).st_mode & 0o7777)
    os.replace(tmp, path)
except BaseException:
    os.unlink(tmp)
    raise
PY
}

measure_client_into_policy() {
    local client_dir="${INSTANCE_DIR_PREFIX}_client" mr_enclave mr_signer values
    values="$(measure "$client_dir")"
    read -r mr_enclave mr_signer <<<"$values"
    update_policy "$mr_enclave" "$mr_signer" || die "could not update $POLICY_FILE"
    log "client mr_enclave $mr_enclave"
    log "client mr_signer  $mr_signer"
    log "written to app $APP_ID of $POLICY_FILE"
}

# The original's way after a policy change: put the file into the server image, occlum build.
rebuild_server_policy() {
    local dir="${INSTANCE_DIR_PREFIX}_server"
    [ -d "$dir/image" ] || die "$dir not built yet: run '$0 all' or '$0 server'"
    local ref at
    mkdir -p "$dir/image/etc/asps"
    cp "$POLICY_FILE" "$dir/image/etc/asps/$(basename "$POLICY_FILE")"
    for ref in "${POLICY_REFS[@]}"; do
        if [[ "$ref" = /* ]]; then
            at="$dir/image$ref"
            mkdir -p "$(dirname "$at")"
            cp "$ref" "$at"
        else
            at="$dir/image/etc/asps/$ref"
            mkdir -p "$(dirname "$at")"
            cp "$(dirname "$POLICY_FILE")/$ref" "$at"
        fi
    done
    (cd "$dir" && occlum_build)
}

main() {
    local what="${1:-all}"
    case "$what" in
        -h | --help | help) usage; return 0 ;;
        all | client | server | policy) ;;
        *) usage >&2; die "unknown command '$what'" ;;
    esac
    [ "$#" -le 1 ] || die "too many arguments"
    check_tools
    check_measure_tool
    # shellcheck disable=SC2086  # the file lists are space-separated on purpose
    case "$what" in
        all | client | server)
            check_python_runtime
            require_files "$CERTS_DIR" ca.crt
            [ "$what" = client ] || require_files "$CERTS_DIR" server.crt server.key
            [ "$what" = server ] || require_files "$ASPS_SRC_DIR" $ASPS_CLIENT_FILES
            [ "$what" = client ] || require_files "$ASPS_SRC_DIR" $ASPS_SERVER_FILES
            ;;
    esac
    local refs ref path
    refs="$(update_policy check)" || die "cannot update $POLICY_FILE"
    POLICY_REFS=()
    while IFS= read -r ref; do
        [ -n "$ref" ] || continue
        path="$ref"
        [[ "$ref" = /* ]] || path="$(dirname "$POLICY_FILE")/$ref"
        [ -f "$path" ] || die "$POLICY_FILE names $ref, but $path does not exist"
        POLICY_REFS+=("$ref")
    done <<<"$refs"
    [[ "$OCCLUM_MAX_THREADS" =~ ^[1-9][0-9]*$ ]] || die "OCCLUM_MAX_THREADS must be a number"
    case "$OCCLUM_DEBUGGABLE" in
        false) ;;
        true) log "warning: debuggable enclaves (the host can read their memory); the policy must allow_debug" ;;
        *) die "OCCLUM_DEBUGGABLE must be true or false, not '$OCCLUM_DEBUGGABLE'" ;;
    esac
    case "$what" in
        all) build_instance client; measure_client_into_policy; build_instance server ;;
        client) build_instance client; measure_client_into_policy ;;
        server) measure_client_into_policy; build_instance server ;;
        policy) measure_client_into_policy; rebuild_server_policy ;;
    esac
    log "done"
}

main "$@"
