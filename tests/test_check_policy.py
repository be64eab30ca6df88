"""`asps_server.py check-policy FILE [--online]`: every offline refusal listed with its app and secret,
the online checks against a real OpenBao (a good app, an app whose token reads another app's path,
bad credentials), exit codes; and the server refusing the shipped example's placeholder tokens at
start and on reload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from asps_testkit import ENCLAVE_1, module_env, module_logs, write_policy  # noqa: F401  (fixtures: env, logs)
from openbao import OpenBao, openbao_server  # noqa: F401  (fixture)

import asps_server
import policy_check

REPO = Path(__file__).resolve().parent.parent


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "asps_server.py"), "check-policy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def vault_doc(addr: str, apps: list[dict]) -> dict:
    return {"kms": "vault", "addr": addr, "app_list": apps}


def app(app_id: int, secrets: dict[str, str], **extra: object) -> dict:
    return {"id": app_id, "mr_enclave": f"{app_id:02x}" * 32, "secrets": secrets, **extra}


def save(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


BAD_REFS = {
    "dotdot": "occlum/../1/x",
    "double_slash": "occlum/1//x",
    "query": "occlum/1/x?version=1",
    "escape": "occlum/1/%2e%2e/x",
    "dot": "occlum/./x",
    "empty_field": "occlum/1/x#",
}


def test_offline_lists_every_bad_reference_placeholder_and_inline_secret_id(tmp_path: Path) -> None:
    doc = vault_doc(
        "http://127.0.0.1:8200",
        [
            app(1, {**BAD_REFS, "fine": "occlum/1/image_key"}, app_token="s.looks-real"),
            app(2, {"master_key": "occlum/2/image_key"}, app_token="APP2_TOKEN-from-write_secrets.sh"),
            app(
                3,
                {"master_key": "occlum/3/image_key"},
                auth={"method": "approle", "role_id_file": "r", "secret_id": "inline-secret-id-value"},
            ),
        ],
    )
    proc = check(str(save(tmp_path / "p.json", doc)))
    assert proc.returncode == policy_check.EXIT_FINDINGS, proc.stdout + proc.stderr
    out = proc.stdout
    for name in BAD_REFS:
        assert f"app 1: field 'secrets.{name}'" in out, (name, out)
    assert "'secrets.fine'" not in out
    assert "app 2: field 'app_token' is a placeholder" in out
    assert "app 3: field 'auth.secret_id'" in out and "never written inline" in out
    assert "inline-secret-id-value" not in out and "APP2_TOKEN" not in out and "s.looks-real" not in out
    assert "%2e" not in out, "a refused reference is described, not repeated"

    as_json = [json.loads(line) for line in check(str(tmp_path / "p.json"), "--json").stdout.splitlines()]
    assert {(f["app"], f["secret"]) for f in as_json if f["app"] == "1"} == {("1", n) for n in BAD_REFS}


def test_exit_codes_and_help(tmp_path: Path) -> None:
    good = save(
        tmp_path / "good.json", vault_doc("http://127.0.0.1:8200", [app(1, {"k": "m/p"}, app_token="s.x1")])
    )
    proc = check(str(good))
    assert proc.returncode == policy_check.EXIT_OK, proc.stdout
    assert "0 error(s)" in proc.stdout and "s.x1" not in proc.stdout
    assert check().returncode == policy_check.EXIT_USAGE
    assert check(str(good), "--bogus").returncode == policy_check.EXIT_USAGE
    helped = check("--help")
    assert helped.returncode == 0 and "exit codes:" in helped.stdout and "--online" in helped.stdout
    assert check(str(tmp_path / "missing.json")).returncode == policy_check.EXIT_FINDINGS
    shipped = check(str(REPO / "policy_vault.json"))
    assert shipped.returncode == policy_check.EXIT_FINDINGS
    assert "app 1: field 'app_token' is a placeholder" in shipped.stdout
    assert "app 2: field 'app_token' is a placeholder" in shipped.stdout


def test_online_good_app_too_wide_app_and_bad_credentials(
    openbao_server: OpenBao,  # noqa: F811
    tmp_path: Path,
) -> None:
    bao = openbao_server
    token1 = bao.add_app(1, {"image_key": "v1"})
    token2 = bao.add_app(2, {"image_key": "v2"})
    bao.read_policy("too-wide", "occlum/*")
    wide = bao.create_token(["too-wide"], ttl="30m")
    doc = vault_doc(
        bao.addr,
        [
            app(1, {"master_key": "occlum/1/image_key"}, app_token=token1),
            app(2, {"master_key": "occlum/2/image_key"}, app_token=token2),
        ],
    )
    good = check(str(save(tmp_path / "good.json", doc)), "--online")
    assert good.returncode == 0, good.stdout
    assert f"ok: Vault {bao.addr}: reachable, active" in good.stdout
    assert "ok: app 1: secret 'master_key': readable (occlum/1/image_key)" in good.stdout
    assert "ok: app 1 (token): token valid, TTL" in good.stdout

    doc["app_list"][1]["app_token"] = wide
    flagged = check(str(save(tmp_path / "wide.json", doc)), "--online")
    assert flagged.returncode == 1
    assert (
        "error: app 2: its token can read app 1's secret 'master_key' (occlum/1/image_key)" in flagged.stdout
    )
    assert "warning: app 2 (token): the static token expires in" in flagged.stdout

    doc["app_list"][1]["app_token"] = "s.not-a-valid-token-at-all"
    bad = check(str(save(tmp_path / "bad.json", doc)), "--online")
    assert bad.returncode == 1
    assert "error: app 2 (token): token lookup failed" in bad.stdout
    for token in (token1, token2, wide, "s.not-a-valid-token-at-all", bao.root_token or ""):
        for out in (good, flagged, bad):
            assert token not in out.stdout + out.stderr

    doc["addr"] = "http://127.0.0.1:9"
    down = check(str(save(tmp_path / "down.json", doc)), "--online")
    assert down.returncode == 1 and "http://127.0.0.1:9: unreachable" in down.stdout


def test_server_refuses_placeholder_tokens_at_start_and_on_reload(env, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "asps_server.py"),
            "--policy",
            str(REPO / "policy_vault.json"),
            "--cert",
            str(env.certs / "server.crt"),
            "--key",
            str(env.certs / "server.key"),
            "--host",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "app 1: field 'app_token' is a placeholder" in proc.stderr, proc.stderr

    doc = vault_doc("http://127.0.0.1:8200", [app(1, {"k": "occlum/1/x"}, app_token="s.fine")])
    doc["app_list"][0]["mr_enclave"] = ENCLAVE_1.hex()
    path = write_policy(tmp_path / "p.json", doc)
    handle = asps_server.serve(env.config(path))
    try:
        digest = handle.provisioner.policy.digest
        doc["app_list"][0]["app_token"] = "APP1_TOKEN-from-write_secrets.sh"
        write_policy(path, doc)
        assert handle.reload_policy() is False
        assert handle.provisioner.policy.digest == digest, "a bad file keeps the old policy"
    finally:
        handle.stop(0)


@pytest.mark.parametrize("ref", list(BAD_REFS.values()))
def test_agent_refuses_what_check_policy_refuses(ref: str) -> None:
    import kms

    with pytest.raises(kms.KmsConfigError):
        kms.parse_ref(ref)
