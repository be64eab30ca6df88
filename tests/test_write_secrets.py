"""write_secrets.sh against a real OpenBao, read back with kms.VaultAgent and the tokens it printed."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from openbao import OpenBao, bao_bin_dir

from kms import KmsDenied, VaultAgent

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "write_secrets.sh"
IMAGE_KEY = re.compile(rb"^[0-9a-f]{2}(-[0-9a-f]{2}){15}$")  # `occlum gen-image-key` format
NAMES = ("image_key", "rsa_prikey", "rsa_pubkey")


def run_script(
    server: OpenBao, cwd: Path, *args: str, token: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(
        {"VAULT_ADDR": server.addr, "PATH": f"{bao_bin_dir()}:{env.get('PATH', '/usr/bin:/bin')}", **extra}
    )
    if token:
        env["VAULT_TOKEN"] = token
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def printed_tokens(stdout: str) -> dict[str, str]:
    found = dict(re.findall(r"^APP(\d+)_TOKEN=(\S+)$", stdout, re.M))
    assert set(found) == {"1", "2"}, stdout
    return found


def policy_template(path: Path, addr: str) -> None:
    path.write_text(
        json.dumps(
            {
                "kms": "vault",
                "addr": addr,
                "auth_method": "token",
                "app_list": [
                    {
                        "id": 1,
                        "mr_enclave": "ab" * 32,
                        "app_token": "",
                        "secrets": {"master_key": "occlum/1/image_key"},
                    },
                    {
                        "id": 2,
                        "mr_enclave": "cd" * 32,
                        "app_token": "",
                        "secrets": {"master_key": "occlum/2/image_key"},
                    },
                ],
            }
        )
    )
    path.chmod(0o644)


def read_back_and_check_isolation(server: OpenBao, tokens: dict[str, str]) -> dict[str, dict[str, bytes]]:
    values: dict[str, dict[str, bytes]] = {}
    for app, other in (("1", "2"), ("2", "1")):
        agent = VaultAgent(server.addr, tokens[app])
        values[app] = {name: agent.get(f"occlum/{app}/{name}") for name in NAMES}
        for name in NAMES:
            with pytest.raises(KmsDenied) as info:
                agent.get(f"occlum/{other}/{name}")
            assert not info.value.token_invalid
    for app in ("1", "2"):
        v = values[app]
        assert IMAGE_KEY.match(v["image_key"]), "image_key is 16 bytes as dash-separated lower-case hex"
        private = serialization.load_pem_private_key(v["rsa_prikey"], password=None)
        assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 3072
        public = serialization.load_pem_public_key(v["rsa_pubkey"])
        assert public.public_numbers() == private.public_key().public_numbers()
    assert values["1"]["image_key"] != values["2"]["image_key"]
    return values


def assert_no_values_in(text: str, values: dict[str, dict[str, bytes]], *more: str) -> None:
    for app_values in values.values():
        for value in app_values.values():
            body = (
                value.decode()
                .replace("-----BEGIN PUBLIC KEY-----", "")
                .replace("-----BEGIN PRIVATE KEY-----", "")
            )
            assert body.strip().splitlines()[0] not in text
    for secret in more:
        assert secret not in text


def test_fresh_server_init_kv1_tokens_policy_file_and_rerun(tmp_path: Path) -> None:
    with OpenBao(tmp_path / "bao", initialize=False) as server:
        work = tmp_path / "work"
        work.mkdir()
        policy = work / "policy_vault.json"
        policy_template(policy, server.addr)
        before = json.loads(policy.read_text())

        result = run_script(server, work, "--policy", str(policy))
        assert result.returncode == 0, result.stderr
        tokens = printed_tokens(result.stdout)

        init_file = work / "vault_init.json"
        assert stat.S_IMODE(init_file.stat().st_mode) == 0o600
        init = json.loads(init_file.read_text())
        server.adopt_init(init["unseal_keys_b64"][0], init["root_token"])
        assert server.kv_version("occlum/1/x") == 1 and server.kv_version("occlum/2/x") == 1

        values = read_back_and_check_isolation(server, tokens)
        everything = result.stdout + result.stderr
        assert_no_values_in(everything, values, init["root_token"], init["unseal_keys_b64"][0])

        # the policy file got exactly the two tokens, nothing else changed, and is private now
        after = json.loads(policy.read_text())
        assert [a["app_token"] for a in after["app_list"]] == [tokens["1"], tokens["2"]]
        for entry in before["app_list"]:
            entry["app_token"] = tokens[str(entry["id"])]
        assert after == before
        assert stat.S_IMODE(policy.stat().st_mode) == 0o600
        assert not list(work.glob(".policy_vault.json.*")), "no temp file left behind"

        # Restart: the server comes back sealed; a rerun unseals it from the init file and keeps the secrets.
        server.stop()
        server.start(unseal=False)
        assert server.request("GET", "sys/seal-status")["sealed"] is True
        rerun = run_script(server, work)
        assert rerun.returncode == 0, rerun.stderr
        assert "kept" in rerun.stderr
        new_tokens = printed_tokens(rerun.stdout)
        again = read_back_and_check_isolation(server, new_tokens)
        assert again == values, "existing secrets are not rotated without --overwrite"
        # the first tokens still work too
        assert VaultAgent(server.addr, tokens["1"]).get("occlum/1/image_key") == values["1"]["image_key"]


def test_given_token_kv2(openbao_kv2: OpenBao, tmp_path: Path) -> None:
    server = openbao_kv2
    result = run_script(server, tmp_path, token=server.root_token, KV_VERSION="2")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "vault_init.json").exists(), "no init when a token is given"
    assert server.kv_version("occlum/1/x") == 2 and server.kv_version("occlum/2/x") == 2
    tokens = printed_tokens(result.stdout)
    values = read_back_and_check_isolation(server, tokens)
    assert_no_values_in(result.stdout + result.stderr, values, server.root_token or "")
    # --overwrite rotates
    rotated = run_script(server, tmp_path, "--overwrite", token=server.root_token, KV_VERSION="2")
    assert rotated.returncode == 0, rotated.stderr
    assert VaultAgent(server.addr, tokens["1"]).get("occlum/1/image_key") != values["1"]["image_key"]


def test_policy_file_without_app_2_is_refused_and_left_unchanged(
    openbao_kv2: OpenBao, tmp_path: Path
) -> None:
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"kms": "vault", "app_list": [{"id": 1, "app_token": ""}]}))
    before = policy.read_text()
    result = run_script(openbao_kv2, tmp_path, "--policy", str(policy), token=openbao_kv2.root_token)
    assert result.returncode != 0
    assert "no app_list entry with id 2" in result.stderr
    assert policy.read_text() == before
    assert "TOKEN" not in result.stdout, "checked before any token is created"
    assert "wrote" not in result.stderr and "enabled" not in result.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = run_script(openbao_kv2, tmp_path, "--policy", str(broken), token=openbao_kv2.root_token)
    assert result.returncode != 0 and "cannot read policy file" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_token_and_bad_arguments(openbao_kv2: OpenBao, tmp_path: Path) -> None:
    bad = run_script(openbao_kv2, tmp_path, token="s.not-a-real-token")
    assert bad.returncode != 0 and "not accepted" in bad.stderr
    assert "s.not-a-real-token" not in bad.stdout
    assert run_script(openbao_kv2, tmp_path, "--kv-version", "3").returncode != 0
    assert run_script(openbao_kv2, tmp_path, "--bogus").returncode != 0
    helped = run_script(openbao_kv2, tmp_path, "--help")
    assert helped.returncode == 0 and "--policy FILE" in helped.stdout and "VAULT_TOKEN" in helped.stdout


# `occlum gen-image-key FILE` stand-in (tests/standins/occlum has no gen-image-key): the Nth call
# writes the Nth line of keys.txt, with the trailing newline the script must strip, and logs argv.
OCCLUM_GEN_IMAGE_KEY = """#!/bin/sh
here=$(dirname "$0")
echo "$*" >>"$here/calls.log"
[ "$1" = gen-image-key ] && [ $# -eq 2 ] || { echo "stand-in occlum: only gen-image-key FILE" >&2; exit 2; }
n=$(( $(wc -l <"$here/calls.log") ))
sed -n "${n}p" "$here/keys.txt" >"$2"
echo "stand-in occlum: image key written to $2"
"""


def test_image_key_comes_from_occlum_gen_image_key_when_on_path(openbao_kv2: OpenBao, tmp_path: Path) -> None:
    keys = {
        "1": "0f-1e-2d-3c-4b-5a-69-78-87-96-a5-b4-c3-d2-e1-f0",
        "2": "de-ad-be-ef-00-11-22-33-44-55-66-77-88-99-aa-bb",
    }
    standin = tmp_path / "bin"
    standin.mkdir()
    (standin / "occlum").write_text(OCCLUM_GEN_IMAGE_KEY)
    (standin / "occlum").chmod(0o755)
    (standin / "keys.txt").write_text(f"{keys['1']}\n{keys['2']}\n")
    path = f"{standin}:{bao_bin_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    # --overwrite: the module's server may already hold image keys from another test
    result = run_script(
        openbao_kv2, tmp_path, "--overwrite", token=openbao_kv2.root_token, KV_VERSION="2", PATH=path
    )
    assert result.returncode == 0, result.stderr
    assert (standin / "calls.log").is_file(), "occlum on PATH was not used for the image keys"
    calls = (standin / "calls.log").read_text().splitlines()
    assert len(calls) == 2 and all(c.startswith("gen-image-key ") for c in calls), calls
    tokens = printed_tokens(result.stdout)
    values = read_back_and_check_isolation(openbao_kv2, tokens)
    for app, key in keys.items():
        assert values[app]["image_key"] == key.encode(), "the occlum-generated key, newline stripped"
    everything = result.stdout + result.stderr
    assert keys["1"] not in everything and keys["2"] not in everything
    assert "stand-in occlum" not in everything, "occlum's own output is not passed on"
    for call in calls:  # the key file was in the script's private work dir, deleted afterwards
        assert not Path(call.split(" ", 1)[1]).exists()


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is required (apt-get install shellcheck)"
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def openbao_kv2(tmp_path_factory: pytest.TempPathFactory):
    with OpenBao(tmp_path_factory.mktemp("bao-kv2")) as server:
        yield server


def test_no_pipeline_stops_reading_early_under_pipefail() -> None:
    """`cmd | grep -q`, `| head` or `| grep -m` end the pipeline's reader before the writer is done:
    the writer gets SIGPIPE, and under pipefail the pipeline fails although the text was found.
    write_secrets.sh's `bao auth list | grep -q approle/` did (8 in 300 runs against OpenBao), and a
    rerun then tried to enable approle again and failed. None of our pipefail scripts may do it."""
    early_exit = re.compile(r"\|\s*(head\b|grep\s+(-\w*[qm]|--quiet|--max-count))")
    found = []
    for script in ("write_secrets.sh", "run.sh", "build_occlum_instance.sh", ".ci/run"):
        text = (REPO / script).read_text()
        assert "pipefail" in text, f"{script} no longer sets pipefail: update this test"
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
            if early_exit.search(code):
                found.append(f"{script}:{number}: {line.strip()}")
    assert not found, found


def test_policy_fills_addr_too(openbao_kv2: OpenBao, tmp_path: Path) -> None:
    policy = tmp_path / "policy_vault.json"
    policy_template(policy, "http://vault.example.invalid:8200")  # the example's placeholder address
    result = run_script(openbao_kv2, tmp_path, "--policy", str(policy), token=openbao_kv2.root_token)
    assert result.returncode == 0, result.stderr
    after = json.loads(policy.read_text())
    assert after["addr"] == openbao_kv2.addr
    assert [a["app_token"] for a in after["app_list"]] == list(printed_tokens(result.stdout).values())
    # an HA cluster's node list that includes $VAULT_ADDR is kept as it is
    nodes = f"http://127.0.0.1:1,{openbao_kv2.addr},http://127.0.0.1:2"
    policy_template(policy, nodes)
    result = run_script(openbao_kv2, tmp_path, "--policy", str(policy), token=openbao_kv2.root_token)
    assert result.returncode == 0, result.stderr
    assert json.loads(policy.read_text())["addr"] == nodes


def test_auth_approle_end_to_end(openbao_kv2: OpenBao, tmp_path: Path) -> None:
    import asps_server
    import policy as policy_mod

    policy = tmp_path / "policy_vault.json"
    policy_template(policy, "http://vault.example.invalid:8200")
    result = run_script(
        openbao_kv2,
        tmp_path,
        "--auth",
        "approle",
        "--policy",
        str(policy),
        "--token-ttl",
        "3s",
        "--token-max-ttl",
        "6s",
        token=openbao_kv2.root_token,
        KV_VERSION="2",
    )
    assert result.returncode == 0, result.stderr
    assert "TOKEN=" not in result.stdout, "no static token is made or printed with --auth approle"
    files = dict(re.findall(r"^APP(\d_(?:ROLE|SECRET)_ID_FILE)=(\S+)$", result.stdout, re.M))
    assert len(files) == 4, result.stdout
    secret_ids = []
    for name in files.values():
        path = tmp_path / name if not Path(name).is_absolute() else Path(name)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        if "secret_id" in name:
            secret_ids.append(path.read_text().strip())
    for secret_id in secret_ids:
        assert secret_id and secret_id not in result.stdout + result.stderr

    doc = json.loads(policy.read_text())
    assert doc["addr"] == openbao_kv2.addr and doc["auth_method"] == "approle"
    assert all("app_token" not in a and a["auth"]["method"] == "approle" for a in doc["app_list"])
    assert stat.S_IMODE(policy.stat().st_mode) == 0o600

    # the server's own loader reads each app's secrets with them, and nothing of the other app's
    loaded = policy_mod.load_policy(policy)
    assert not loaded.warnings, loaded.warnings
    values = {app.id: app.fetch(["master_key"])["master_key"] for app in loaded.apps}
    assert IMAGE_KEY.match(values["1"]) and IMAGE_KEY.match(values["2"]) and values["1"] != values["2"]
    with pytest.raises(KmsDenied):
        loaded.apps[0].agent.get("occlum/2/image_key")

    # check-policy --online agrees: logins work, TTLs are printed, no cross-app read
    proc = subprocess.run(
        [sys.executable, str(REPO / "asps_server.py"), "check-policy", str(policy), "--online"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^ok: app 1 \(approle\): token valid, TTL [0-3]s", proc.stdout, re.M), proc.stdout
    assert re.search(r"^warning: app 1 \(approle\): token TTL [0-3]s is short", proc.stdout, re.M)
    assert "app 2: cannot read any other app's secret" in proc.stdout
    for secret_id in secret_ids:
        assert secret_id not in proc.stdout + proc.stderr
    assert asps_server.Kind.CONFIG  # the module loads with the check-policy dispatch


def test_approle_credentials_are_never_written_where_others_can_plant_a_link(
    openbao_kv2: OpenBao, tmp_path: Path
) -> None:
    """A creds dir others can write is refused; in our own dir, a link planted at the old temp-file
    names is never written through, and the secret_id lands in a regular file of mode 0600."""
    policy = tmp_path / "policy_vault.json"
    policy_template(policy, openbao_kv2.addr)
    shared = tmp_path / "shared-creds"
    shared.mkdir()
    shared.chmod(0o1777)
    args = ("--auth", "approle", "--policy", str(policy))
    token = openbao_kv2.root_token
    result = run_script(openbao_kv2, tmp_path, *args, "--creds-dir", str(shared), token=token)
    assert result.returncode != 0 and "writable by its group or by others" in result.stderr
    assert not any(shared.iterdir())

    own = tmp_path / "own-creds"
    own.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    for name in ("app1_secret_id.tmp", "app1_role_id.tmp"):
        os.symlink(victim, own / name)
    result = run_script(openbao_kv2, tmp_path, *args, "--creds-dir", str(own), token=token)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "untouched"
    secret_id = own / "app1_secret_id"
    assert not secret_id.is_symlink() and stat.S_IMODE(secret_id.stat().st_mode) == 0o600
    assert secret_id.read_text().strip()
