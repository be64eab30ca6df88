"""build_occlum_instance.sh and the Gramine manifest template, run against stand-in tools.

The stand-ins in tests/standins (occlum, copy_bom, sgx_sign, gramine-manifest) log every
call and produce the files the real tools would, so the script's command sequence, the
files it puts into the images, its Occlum.json edits and its policy edit can be checked on
a machine without SGX. The measurement the stand-in occlum computes is a hash of the image
tree, so a copied file that changes changes mr_enclave, as it would in Occlum.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "build_occlum_instance.sh"
STANDINS = REPO / "tests" / "standins"
TEMPLATE = REPO / "asps_client.manifest.template"
BASH = shutil.which("bash") or "/bin/bash"

# The enclave side (what `import asps_client` loads, tests/test_layout.py) and the requirements.
CLIENT_FILES = [
    "asps_client.py",
    "asps_wire.py",
    "cli_env.py",
    "ratls_attest.py",
    "attester.py",
    "dcap_quote.py",
    "asps_pb2.py",
    "asps_pb2_grpc.py",
    "requirements.txt",
]
# Tenant side: never in the client image.
SERVER_ONLY = ["asps_server.py", "ops.py", "policy.py", "policy_check.py", "kms.py", "ratls.py", "dcap.py",
               "dcap_collateral.py", "x509_chain.py", "pccs.py", "intel_sgx_root_ca.der"]
# Copied when present; the workspace has the first two only.
OPTIONAL = ["secretmanager_pb2.py", "secretmanager_pb2_grpc.py"]
CERTS = ["ca.crt", "server.crt", "server.key"]
# Occlum's etc/template/base.yaml (the directories every image gets).
BASE_YAML = """\
# basic directories in image
targets:
  - target: /
    mkdirs:
      - bin
      - dev
      - etc
      - host
      - lib
      - lib64
      - opt
      - proc
      - root
      - sys
      - tmp
      - sbin
      - ext2
"""
POLICY = {
    "kms": "vault",
    "addr": "http://127.0.0.1:8200",
    "auth_method": "token",
    "root_key": "",
    "app_list": [
        {
            "id": 1,
            "mr_enclave": "abc",
            "app_token": "tok-1",
            "allow_debug": False,
            "secrets": {"master_key": "occlum/1/image_key"},
        },
        {
            "id": 2,
            "mr_enclave": "def",
            "mr_signer": "22" * 32,
            "app_token": "tok-2",
            "secrets": {"master_key": "occlum/2/master_key"},
        },
    ],
}


@dataclass
class Workspace:
    root: Path
    src: Path
    python_dir: Path
    glibc: Path
    log: Path
    env: dict[str, str]

    @property
    def policy(self) -> Path:
        return self.src / "policy_vault.json"

    def instance(self, kind: str) -> Path:
        return self.root / f"occlum_instance_{kind}"

    def run(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [BASH, str(SCRIPT), *args],
            env={**self.env, **env},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"build_occlum_instance.sh {args} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def clear_log(self) -> None:
        self.log.unlink(missing_ok=True)

    def standin_print(self, what: str) -> str:
        """What the stand-in `occlum print` reports for the built client instance."""
        out = subprocess.run(
            [str(STANDINS / "occlum"), "print", what],
            cwd=self.instance("client"),
            env={**self.env, "ASPS_STANDIN_LOG": ""},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()


def make_workspace(root: Path) -> Workspace:
    src = root / "src"
    (src / "certs").mkdir(parents=True)
    for i, name in enumerate(CLIENT_FILES + SERVER_ONLY + OPTIONAL[:1]):
        # Distinct bytes per file, binary included, so a mix-up or a text-mode copy shows.
        (src / name).write_bytes(f"# {name}\n".encode() + os.urandom(64) + bytes([i, 0, 255]))
    for name in CERTS:
        (src / "certs" / name).write_bytes(f"-----{name}-----\n".encode() + os.urandom(32))
    (src / "policy_vault.json").write_text(json.dumps(POLICY, indent=2))
    # A stand-in conda prefix whose python3 is this interpreter (it has the requirements).
    python_dir = root / "python-occlum"
    (python_dir / "bin").mkdir(parents=True)
    (python_dir / "bin" / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (python_dir / "bin" / "python3").chmod(0o755)
    (python_dir / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (python_dir / "lib" / "python3.11" / "site-packages" / "marker.py").write_text("X = 1\n")
    template_dir = root / "template"
    template_dir.mkdir()
    (template_dir / "base.yaml").write_text(BASE_YAML)
    glibc = root / "glibc" / "lib"
    glibc.mkdir(parents=True)
    (glibc / "libnss_files.so.2").write_bytes(b"\x7fELF nss_files")
    (glibc / "libresolv.so.2").write_bytes(b"\x7fELF resolv")
    log = root / "standin.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGX_", "OCCLUM", "MEASURE", "ASPS_"))}
    env.update(
        PATH=f"{STANDINS}{os.pathsep}{os.environ['PATH']}",
        ASPS_STANDIN_LOG=str(log),
        ASPS_SRC_DIR=str(src),
        INSTANCE_DIR_PREFIX=str(root / "occlum_instance"),
        OCCLUM_PYTHON_DIR=str(python_dir),
        OCCLUM_TEMPLATE_DIR=str(template_dir),
        OCCLUM_GLIBC_DIR=str(glibc),
        TMPDIR=str(root),
        SGX_SDK=str(root / "no-sgxsdk"),  # so that only the stand-in sgx_sign can be found
    )
    return Workspace(root, src, python_dir, glibc, log, env)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    """One full `all` build, inspected by several tests."""
    ws = make_workspace(tmp_path_factory.mktemp("occlum"))
    ws.run()
    return ws


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return make_workspace(tmp_path)


def summary(calls: list[dict]) -> list[tuple[str, str, str]]:
    """(tool, sub-command, directory name) for each call."""
    return [(c["tool"], c["argv"][0], Path(c["cwd"]).name) for c in calls]


# ---------------------------------------------------------------- the command sequence


def test_all_runs_new_copy_build_measure_then_the_server(built: Workspace) -> None:
    calls = built.calls()
    root = built.root.name
    assert summary(calls) == [
        ("occlum", "new", root),
        ("copy_bom", "-f", "occlum_instance_client"),
        ("occlum", "build", "occlum_instance_client"),
        ("sgx_sign", "dump", root),
        ("occlum", "new", root),
        ("copy_bom", "-f", "occlum_instance_server"),
        ("occlum", "build", "occlum_instance_server"),
    ]
    assert calls[0]["argv"] == ["new", str(built.instance("client"))]
    assert calls[4]["argv"] == ["new", str(built.instance("server"))]
    bom = calls[1]["argv"]
    assert bom[bom.index("--root") + 1] == "image"
    assert bom[bom.index("--include-dir") + 1] == built.env["OCCLUM_TEMPLATE_DIR"]
    dump = calls[3]["argv"]
    assert dump[dump.index("-enclave") + 1] == str(
        built.instance("client") / "build/lib/libocclum-libos.signed.so"
    )
    assert not Path(dump[dump.index("-dumpfile") + 1]).exists(), "temporary dump file left behind"


# ---------------------------------------------------------------- what goes into the images


def test_client_image_has_the_client_modules_and_the_ca_only(built: Workspace) -> None:
    image = built.instance("client") / "image"
    for name in CLIENT_FILES:
        assert (image / "bin" / name).read_bytes() == (built.src / name).read_bytes(), name
    assert (image / "etc/asps/ca.crt").read_bytes() == (built.src / "certs/ca.crt").read_bytes()
    for name in OPTIONAL[:1]:
        assert (image / "bin" / name).read_bytes() == (built.src / name).read_bytes(), name
    assert not (image / "bin" / OPTIONAL[1]).exists()
    for name in SERVER_ONLY:
        assert not (image / "bin" / name).exists(), f"server module {name} in the client image"
    leaked = [p for p in image.rglob("*") if p.name in ("server.key", "server.crt", "policy_vault.json")]
    assert leaked == [], f"server material in the client image: {leaked}"


def test_server_image_has_server_modules_certs_and_the_measured_policy(built: Workspace) -> None:
    image = built.instance("server") / "image"
    shared = ["asps_wire.py", "cli_env.py", "ratls_attest.py", "attester.py", "dcap_quote.py", "asps_pb2.py",
              "asps_pb2_grpc.py"]
    for name in [*SERVER_ONLY, *OPTIONAL[:1], *shared]:
        assert (image / "bin" / name).read_bytes() == (built.src / name).read_bytes(), name
    assert not (image / "bin" / "asps_client.py").exists()
    for name in CERTS:
        assert (image / "etc/asps" / name).read_bytes() == (built.src / "certs" / name).read_bytes()
    assert (image / "etc/asps/policy_vault.json").read_bytes() == built.policy.read_bytes()


def test_python_runtime_is_packed_the_occlum_demo_way(built: Workspace) -> None:
    for kind in ("client", "server"):
        image = built.instance(kind) / "image"
        packed = image / "opt" / "python-occlum"
        assert (packed / "bin/python3").read_bytes() == (built.python_dir / "bin/python3").read_bytes()
        assert (packed / "lib/python3.11/site-packages/marker.py").is_file()
        link = image / "bin" / "python3"
        assert link.is_symlink() and os.readlink(link) == "/opt/python-occlum/bin/python3"
        # base.yaml was applied (copy_bom include) and glibc's dlopen'ed libraries copied.
        assert (image / "sys").is_dir() and (image / "ext2").is_dir()
        in_image = image / str(built.glibc).lstrip("/")
        assert sorted(p.name for p in in_image.iterdir()) == ["libnss_files.so.2", "libresolv.so.2"]


def test_occlum_json_is_set_for_python(built: Workspace) -> None:
    for kind in ("client", "server"):
        conf = json.loads((built.instance(kind) / "Occlum.json").read_text())
        limits = conf["resource_limits"]
        assert limits["user_space_size"] == "640MB"
        assert limits["kernel_space_heap_size"] == "64MB"
        assert limits["max_num_of_threads"] == 64
        assert limits["kernel_space_stack_size"] == "1MB", "template field lost"
        assert "PYTHONHOME=/opt/python-occlum" in conf["env"]["default"]
        assert "OCCLUM=yes" in conf["env"]["default"], "template env lost"
        assert conf["env"]["untrusted"] == [], "host env must not reach the enclave"
        assert conf["metadata"]["debuggable"] is False
        assert conf["entry_points"] == ["/bin"]
        assert conf["mount"][0]["type"] == "unionfs"


def test_occlum_json_settings_follow_the_environment(ws: Workspace) -> None:
    ws.run("client", OCCLUM_DEBUGGABLE="true", OCCLUM_USER_SPACE_SIZE="1GB", OCCLUM_MAX_THREADS="96")
    conf = json.loads((ws.instance("client") / "Occlum.json").read_text())
    assert conf["metadata"]["debuggable"] is True
    assert conf["resource_limits"]["user_space_size"] == "1GB"
    assert conf["resource_limits"]["max_num_of_threads"] == 96
    ws.clear_log()
    bad = ws.run("client", check=False, OCCLUM_DEBUGGABLE="yes")
    assert bad.returncode != 0 and "OCCLUM_DEBUGGABLE must be true or false" in bad.stderr
    assert ws.calls() == []


# ---------------------------------------------------------------- the policy edit


def test_policy_gets_the_client_measurement_for_app_1_only(built: Workspace) -> None:
    policy = json.loads(built.policy.read_text())
    app1, app2 = policy["app_list"]
    assert app1["mr_enclave"] == built.standin_print("mrenclave")
    assert app1["mr_signer"] == built.standin_print("mrsigner")
    assert len(app1["mr_enclave"]) == 64 and app1["mr_enclave"] != app1["mr_signer"]
    expected1 = {**POLICY["app_list"][0], "mr_enclave": app1["mr_enclave"], "mr_signer": app1["mr_signer"]}
    assert app1 == expected1
    assert app2 == POLICY["app_list"][1]
    assert {k: v for k, v in policy.items() if k != "app_list"} == {
        k: v for k, v in POLICY.items() if k != "app_list"
    }
    assert list(policy) == list(POLICY), "key order changed"
    assert built.policy.read_text().splitlines()[1] == '  "kms": "vault",', "indentation changed"
    leftovers = [p.name for p in built.src.iterdir() if p.name.startswith(".policy-")]
    assert leftovers == []


def test_rerun_is_idempotent(ws: Workspace) -> None:
    ws.run()
    first_policy = ws.policy.read_bytes()
    first_server_policy = (ws.instance("server") / "image/etc/asps/policy_vault.json").read_bytes()
    ws.clear_log()
    ws.run()
    assert ws.policy.read_bytes() == first_policy
    assert (ws.instance("server") / "image/etc/asps/policy_vault.json").read_bytes() == first_server_policy
    assert [c for c in summary(ws.calls()) if c[1] == "new"] == [("occlum", "new", ws.root.name)] * 2


def test_a_changed_client_module_changes_mr_enclave_not_mr_signer(ws: Workspace) -> None:
    ws.run("client")
    before = json.loads(ws.policy.read_text())["app_list"][0]
    with (ws.src / "ratls_attest.py").open("ab") as f:
        f.write(b"# patched\n")
    ws.run("client")
    after = json.loads(ws.policy.read_text())["app_list"][0]
    assert after["mr_enclave"] != before["mr_enclave"]
    assert after["mr_signer"] == before["mr_signer"]
    assert after["mr_enclave"] == ws.standin_print("mrenclave")
    assert not ws.instance("server").exists(), "'client' must not build the server"


def test_sign_key_option_reaches_occlum_build_and_mr_signer(ws: Workspace, built: Workspace) -> None:
    key = ws.root / "signing.pem"
    key.write_bytes(os.urandom(48))
    ws.run("client", OCCLUM_BUILD_OPTS=f"--sign-key {key}")
    builds = [c["argv"] for c in ws.calls() if c["tool"] == "occlum" and c["argv"][0] == "build"]
    assert builds == [["build", "--sign-key", str(key)]]
    app1 = json.loads(ws.policy.read_text())["app_list"][0]
    assert app1["mr_signer"] == ws.standin_print("mrsigner")
    # `built` was signed with the default (template) key.
    assert json.loads(built.policy.read_text())["app_list"][0]["mr_signer"] != app1["mr_signer"]


def test_occlum_print_measures_when_sgx_sign_is_absent(ws: Workspace, tmp_path: Path) -> None:
    only = tmp_path / "only-occlum"
    only.mkdir()
    for tool in ("occlum", "copy_bom"):
        (only / tool).symlink_to(STANDINS / tool)
    path = f"{only}{os.pathsep}{os.environ['PATH']}"
    ws.run("client", PATH=path)
    measuring = [c["argv"] for c in ws.calls() if c["argv"][0] in ("print", "dump")]
    assert measuring == [["print", "mrenclave"], ["print", "mrsigner"]]
    app1 = json.loads(ws.policy.read_text())["app_list"][0]
    assert app1["mr_enclave"] == ws.standin_print("mrenclave")
    assert app1["mr_signer"] == ws.standin_print("mrsigner")
    forced = ws.run("client", check=False, PATH=path, MEASURE_WITH="sgx_sign")
    assert forced.returncode != 0 and "sgx_sign was not found" in forced.stderr


def test_policy_files_go_into_the_server_image_and_policy_rebuilds_it(ws: Workspace) -> None:
    policy = {**POLICY, "addr": "https://vault.example:8200", "ca_file": "tls/vault-ca.pem"}
    ws.policy.write_text(json.dumps(policy, indent=2))
    proc = ws.run(check=False)
    assert proc.returncode == 1 and "tls/vault-ca.pem" in proc.stderr
    assert ws.calls() == []
    (ws.src / "tls").mkdir()
    vault_ca = ws.src / "tls/vault-ca.pem"
    vault_ca.write_bytes(os.urandom(40))
    ws.run()
    image = ws.instance("server") / "image"
    assert (image / "etc/asps/tls/vault-ca.pem").read_bytes() == vault_ca.read_bytes()
    assert not (ws.instance("client") / "image/etc/asps/tls").exists()

    # The original's way after a policy change: into the server image, `occlum build` again.
    stale = json.loads(ws.policy.read_text())
    assert stale["ca_file"] == "tls/vault-ca.pem"
    stale["app_list"][0]["mr_enclave"] = "00" * 32
    ws.policy.write_text(json.dumps(stale))
    vault_ca.write_bytes(os.urandom(40))  # rotated
    ws.clear_log()
    ws.run("policy")
    assert summary(ws.calls()) == [
        ("sgx_sign", "dump", ws.root.name),
        ("occlum", "build", "occlum_instance_server"),
    ]
    fixed = ws.policy.read_bytes()
    assert json.loads(fixed)["app_list"][0]["mr_enclave"] == ws.standin_print("mrenclave")
    assert (image / "etc/asps/policy_vault.json").read_bytes() == fixed
    assert (image / "etc/asps/tls/vault-ca.pem").read_bytes() == vault_ca.read_bytes()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (json.dumps({"kms": "none", "app_list": [{"id": 2, "mr_enclave": "aa"}]}), "one app with id 1"),
        (json.dumps({"kms": "none"}), "no app_list"),
        ('{"app_list": [', "cannot read"),
    ],
)
def test_bad_policy_is_refused_and_left_untouched(ws: Workspace, content: str, reason: str) -> None:
    ws.policy.write_text(content)
    proc = ws.run("client", check=False)
    assert proc.returncode != 0
    assert reason in proc.stderr
    assert ws.policy.read_text() == content
    assert ws.calls() == [], "the policy is checked before anything is built"


def test_sgx_sign_dump_reads_like_the_original_scripts_read_it(built: Workspace) -> None:
    """The stand-in's dump parsed with the sed/tail pipeline of cczoo and `occlum print`."""
    dump = built.root / "dump.txt"
    so = built.instance("client") / "build/lib/libocclum-libos.signed.so"
    subprocess.run(
        [str(STANDINS / "sgx_sign"), "dump", "-enclave", str(so), "-dumpfile", str(dump)],
        env={**built.env, "ASPS_STANDIN_LOG": ""},
        check=True,
        capture_output=True,
    )
    mr_enclave = (
        f"sed -n -e '/enclave_hash.m/,/metadata->enclave_css.body.isv_prod_id/p' {dump}"
        " | head -3 | tail -2 | xargs | sed 's/0x//g' | sed 's/ //g'"
    )
    mr_signer = f"tail -2 {dump} | xargs | sed 's/0x//g' | sed 's/ //g'"
    out = [
        subprocess.run([BASH, "-c", cmd], capture_output=True, text=True, check=True)
        for cmd in (mr_enclave, mr_signer)
    ]
    app1 = json.loads(built.policy.read_text())["app_list"][0]
    assert [o.stdout.strip() for o in out] == [app1["mr_enclave"], app1["mr_signer"]]


# ---------------------------------------------------------------- usage and missing tools


def test_help_names_the_overridable_paths() -> None:
    proc = subprocess.run([BASH, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    for name in ("OCCLUM_PYTHON_DIR", "POLICY_FILE", "INSTANCE_DIR_PREFIX", "APP_ID", "MEASURE_WITH"):
        assert name in proc.stdout
    bad = subprocess.run([BASH, str(SCRIPT), "bogus"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown command 'bogus'" in bad.stderr


def test_missing_occlum_is_a_clear_error(ws: Workspace, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("python3", "dirname", "basename", "sed", "mktemp", "rm", "mkdir", "cp", "cat"):
        found = shutil.which(tool)
        if found:
            (bare / tool).symlink_to(found)
    proc = ws.run(check=False, PATH=str(bare))
    assert proc.returncode == 1
    assert "occlum not found" in proc.stderr
    (bare / "occlum").symlink_to(STANDINS / "occlum")
    proc = ws.run(check=False, PATH=str(bare))
    assert proc.returncode == 1 and "copy_bom not found" in proc.stderr
    assert ws.calls() == []


def test_missing_python_runtime_is_a_clear_error(ws: Workspace) -> None:
    proc = ws.run(check=False, OCCLUM_PYTHON_DIR=str(ws.root / "nowhere"))
    assert proc.returncode == 1
    assert "conda create --prefix" in proc.stderr and "pip install -r" in proc.stderr
    # A prefix without the requirements installed: the same interpreter without site-packages.
    bare = ws.root / "bare-python"
    (bare / "bin").mkdir(parents=True)
    (bare / "bin/python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    (bare / "bin/python3").chmod(0o755)
    proc = ws.run(check=False, OCCLUM_PYTHON_DIR=str(bare))
    assert proc.returncode == 1 and "lacks the ASPS requirements" in proc.stderr
    assert ws.calls() == [], "nothing may be built with an unusable runtime"


def test_missing_module_or_cert_is_named(ws: Workspace) -> None:
    (ws.src / "ratls.py").unlink()
    proc = ws.run(check=False)
    assert proc.returncode == 1 and "ratls.py" in proc.stderr
    assert ws.calls() == []


# ---------------------------------------------------------------- lint


def test_shellcheck_passes() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (apt-get install shellcheck)"
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_standins_are_ruff_clean() -> None:
    """Extension-less Python files are not picked up by `ruff check .`, so check them here."""
    files = [str(p) for p in STANDINS.iterdir() if p.is_file() and not p.name.endswith(".pyc")]
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- Gramine


def render_manifest(tmp_path: Path, **defines: str) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "asps_client.manifest"
    args = [str(STANDINS / "gramine-manifest")]
    args += [f"-D{k}={v}" for k, v in defines.items()]
    return subprocess.run([*args, str(TEMPLATE), str(out)], capture_output=True, text=True)


GRAMINE_DEFINES = {
    "log_level": "error",
    "arch_libdir": "/lib/x86_64-linux-gnu",
    "entrypoint": "/usr/bin/python3.11",
    "python_packages": "/srv/asps/.venv/lib/python3.11/site-packages",
    "asps_dir": "/srv/asps",
    "ca_cert": "/srv/asps/certs/ca.crt",
    "asps_host": "asps.example.com:50051",
}


def test_gramine_manifest_trusts_the_client_modules_and_enables_dcap(tmp_path: Path) -> None:
    proc = render_manifest(tmp_path, **GRAMINE_DEFINES)
    assert proc.returncode == 0, proc.stderr
    manifest = tomllib.loads((tmp_path / "asps_client.manifest").read_text())
    sgx = manifest["sgx"]
    assert sgx["remote_attestation"] == "dcap"
    assert sgx["debug"] is False
    assert sgx["enclave_size"] and sgx["max_threads"] >= 8
    trusted = set(sgx["trusted_files"])
    for name in [*CLIENT_FILES[:-1], *OPTIONAL]:
        assert f"file:/srv/asps/{name}" in trusted, name
    assert "file:/srv/asps/certs/ca.crt" in trusted
    assert "file:/usr/bin/python3.11" in trusted
    assert not any(name in t for t in trusted for name in SERVER_ONLY)
    assert not any(t.rstrip("/") == "file:/srv/asps" for t in trusted), "whole repo trusted"
    assert manifest["libos"]["entrypoint"] == "/usr/bin/python3.11"
    loader = manifest["loader"]
    assert loader["insecure__use_host_env"] is False
    # The measured arguments pin the server, the CA and the sealed output directory.
    assert "insecure__use_cmdline_argv" not in loader
    argv = loader["argv"]
    assert argv[1] == "/asps/asps_client.py"
    assert argv[argv.index("--host") + 1] == "asps.example.com:50051"
    assert argv[argv.index("--ca") + 1] == "/asps-ca/ca.crt"
    assert argv[argv.index("--out-dir") + 1] == "/secrets"
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    assert mounts["/asps"]["uri"] == "file:/srv/asps"
    assert mounts["/asps-ca/ca.crt"]["uri"] == "file:/srv/asps/certs/ca.crt"
    assert mounts["/secrets"]["type"] == "encrypted"
    assert mounts["/secrets"]["key_name"] == "_sgx_mrenclave"
    assert "allowed_files" not in sgx, "every readable file must be measured"


def test_gramine_manifest_needs_every_define(tmp_path: Path) -> None:
    partial = {k: v for k, v in GRAMINE_DEFINES.items() if k != "ca_cert"}
    proc = render_manifest(tmp_path, **partial)
    assert proc.returncode != 0 and "'ca_cert' is undefined" in proc.stderr


# ---------------------------------------------------------------- run.sh inside the instances


def test_run_sh_runs_server_and_client_inside_the_occlum_instances(tmp_path: Path) -> None:
    """With the instances built, `./run.sh server|client` go through `occlum run`, host settings as flags."""
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copy2(REPO / "run.sh", work / "run.sh")
    for side in ("client", "server"):
        (work / f"occlum_instance_{side}").mkdir()
    log = tmp_path / "standins.log"
    env = {**os.environ, "PATH": f"{STANDINS}:{os.environ['PATH']}", "ASPS_STANDIN_LOG": str(log)}
    env.update(ASPS_HOST="asps.example:50051", ASPS_PCCS="https://pccs.example:8081")
    for cmd in (["client", "--json"], ["server"]):
        subprocess.run(["./run.sh", *cmd], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["cwd"] for c in calls] == [str(work / f"occlum_instance_{s}") for s in ("client", "server")]
    client, server = (c["argv"] for c in calls)
    assert client[:5] == ["run", "/bin/python3", "/bin/asps_client.py", "--ca", "/etc/asps/ca.crt"]
    assert client[5:] == ["--host", "asps.example:50051", "--json", "--key", "master_key"]
    assert server[:3] == ["run", "/bin/python3", "/bin/asps_server.py"]
    assert server[-2:] == ["--pccs", "https://pccs.example:8081"]
