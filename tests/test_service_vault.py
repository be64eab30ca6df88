"""The service against a real OpenBao: KV v1 and KV v2 mounts, per-app read-only tokens, an outage.

app 1's secrets live in a KV v1 mount, app 2's in a KV v2 mount, each app with a token that can
read only its own mount (as write_secrets.sh sets it up).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import grpc
import pytest
from asps_testkit import (  # noqa: F401  (fixtures: client, env, ev1, logs)
    ENCLAVE_1,
    ENCLAVE_2,
    Client,
    assert_no_secret_in,
    module_client,
    module_env,
    module_ev1,
    module_logs,
    write_policy,
)
from openbao import OpenBao, openbao_server  # noqa: F401  (fixture)

import asps_client
import asps_server
import kms


def image_key() -> str:
    """16 random bytes as dash-separated hex, like `occlum gen-image-key`."""
    return "-".join(secrets.token_hex(1) for _ in range(16))


def pem(kind: str) -> str:
    return f"-----BEGIN {kind}-----\n{secrets.token_hex(24)}\n-----END {kind}-----\n"


VALUES = {
    "occlum/1/image_key": image_key(),
    "occlum/1/rsa_pubkey": pem("PUBLIC KEY"),
    "occlum/2/image_key": image_key(),
    "occlum/2/rsa_prikey": pem("PRIVATE KEY"),
}
OTHER_FIELD = "other-field-" + secrets.token_hex(8)


def kv_put(b: OpenBao, path: str, fields: dict[str, str]) -> None:
    """kv_put, waiting out the few seconds a fresh KV v2 mount answers "upgrading" (HTTP 400)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return b.kv_put(path, fields)
        except RuntimeError as e:
            if "Upgrading from non-versioned" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def bao(openbao_server: OpenBao, logs) -> OpenBao:  # noqa: F811
    b = openbao_server
    b.enable_kv("occlum/1", version=1)
    b.enable_kv("occlum/2", version=2)
    for path, value in VALUES.items():
        kv_put(b, path, {"key": value})
    kv_put(b, "occlum/2/multi", {"key": "unused", "other": OTHER_FIELD})
    b.read_policy("app1", "occlum/1/*")
    b.read_policy("app2", "occlum/2/data/*")
    return b


@pytest.fixture(scope="module")
def tokens(bao: OpenBao) -> dict[str, str]:
    return {"app1": bao.create_token(["app1"]), "app2": bao.create_token(["app2"])}


def vault_policy(bao: OpenBao, tokens: dict[str, str]) -> dict:
    return {
        "kms": "vault",
        "addr": bao.addr,
        "auth_method": "token",
        "timeout": 2,
        "app_list": [
            {
                "id": 1,
                "mr_enclave": ENCLAVE_1.hex(),
                "app_token": tokens["app1"],
                "secrets": {"master_key": "occlum/1/image_key", "secret1": "occlum/1/rsa_pubkey"},
            },
            {
                "id": 2,
                "mr_enclave": ENCLAVE_2.hex(),
                "app_token": tokens["app2"],
                "secrets": {
                    "master_key": "occlum/2/image_key",
                    "secret2": "occlum/2/rsa_prikey",
                    "other": "occlum/2/multi#other",
                },
            },
        ],
    }


@pytest.fixture(scope="module")
def server(env, bao, tokens):
    policy = write_policy(env.tmp / "policy_vault.json", vault_policy(bao, tokens))
    handle = asps_server.serve(env.config(policy))
    yield handle
    handle.stop(0)


@pytest.fixture(scope="module")
def ev2(env):
    return env.evidence(ENCLAVE_2, key_type="p384")


def test_kv_v1_secrets_reach_enclave_1(client, ev1):
    app, got = client.get(ev1)
    assert app == "1"
    assert got == {
        "master_key": VALUES["occlum/1/image_key"].encode(),
        "secret1": VALUES["occlum/1/rsa_pubkey"].encode(),
    }


def test_kv_v2_secrets_reach_enclave_2(client, ev2):
    app, got = client.get(ev2, ["secret2", "other"])
    assert app == "2"
    assert got == {"secret2": VALUES["occlum/2/rsa_prikey"].encode(), "other": OTHER_FIELD.encode()}


def test_app1_cannot_obtain_app2_secrets(client, ev1, bao, tokens):
    # refused by the policy: the name is not granted, and nothing says who has it
    req, _ = client.request(ev1, ["secret2"])
    err = client.refused(req)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "not granted to this enclave" in err.details()
    # and app 1's Vault token could not read app 2's secrets anyway
    with pytest.raises(kms.KmsDenied):
        kms.VaultAgent(bao.addr, tokens["app1"]).get("occlum/2/image_key")


def test_policy_pointing_app1_at_app2_path_is_denied_by_vault(env, bao, tokens, ev1):
    """A policy mistake (app 1 mapped to app 2's path) is stopped by app 1's own token."""
    doc = vault_policy(bao, tokens)
    doc["app_list"][0]["secrets"]["stolen"] = "occlum/2/image_key"
    handle = asps_server.serve(env.config(write_policy(env.tmp / "policy-mistake.json", doc)))
    c = Client(f"localhost:{handle.port}", env.ca)
    try:
        req, _ = c.request(ev1, ["stolen"])
        err = c.refused(req)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert "KMS refused" in err.details()
        assert VALUES["occlum/2/image_key"] not in err.details()
        assert c.get(ev1, ["master_key"])[1]["master_key"] == VALUES["occlum/1/image_key"].encode()
    finally:
        c.close()
        handle.stop(0)


def test_missing_secret_in_vault_is_not_found(env, bao, tokens, ev1):
    doc = vault_policy(bao, tokens)
    doc["app_list"][0]["secrets"]["gone"] = "occlum/1/never_written"
    handle = asps_server.serve(env.config(write_policy(env.tmp / "policy-gone.json", doc)))
    c = Client(f"localhost:{handle.port}", env.ca)
    try:
        req, _ = c.request(ev1, ["gone"])
        err = c.refused(req)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "missing from the KMS" in err.details()
    finally:
        c.close()
        handle.stop(0)


def test_vault_stopped_is_unavailable_and_recovers_without_restart(client, server, env, bao, ev1, ev2):
    bao.stop()
    try:
        for ev in (ev1, ev2):
            req, _ = client.request(ev, ["master_key"])
            err = client.refused(req)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "retry later" in err.details()
        with pytest.raises(asps_client.RetryLater) as e:  # what the client library makes of it
            asps_client.fetch_secrets(
                f"localhost:{server.port}", ca=env.ca, evidence=ev1, names=["master_key"]
            )
        assert e.value.exit_code == asps_client.EXIT_RETRY_LATER == 8
    finally:
        bao.start()
    assert client.get(ev1, ["master_key"])[1] == {"master_key": VALUES["occlum/1/image_key"].encode()}
    assert client.get(ev2, ["master_key"])[1] == {"master_key": VALUES["occlum/2/image_key"].encode()}


def test_https_vault_with_ca_file_from_the_policy(env, tmp_path, ev1, logs):
    """`addr` https + `ca_file` relative to the policy file: the app's secrets over verified TLS."""
    with OpenBao(tmp_path / "bao-tls", tls=True) as tls_bao:
        tls_bao.enable_kv("occlum/1", version=2)
        value = image_key()
        VALUES["tls/occlum/1/image_key"] = value  # searched in the logs at the end
        kv_put(tls_bao, "occlum/1/image_key", {"key": value})
        tls_bao.read_policy("app1", "occlum/1/data/*")
        token = tls_bao.create_token(["app1"])
        policy_dir = tmp_path / "policy"
        policy_dir.mkdir()
        (policy_dir / "vault-ca.pem").write_bytes(Path(tls_bao.ca_file).read_bytes())
        doc = {
            "kms": "vault",
            "addr": tls_bao.addr,
            "ca_file": "vault-ca.pem",
            "app_list": [
                {
                    "id": 1,
                    "mr_enclave": ENCLAVE_1.hex(),
                    "app_token": token,
                    "secrets": {"k": "occlum/1/image_key"},
                }
            ],
        }
        handle = asps_server.serve(env.config(write_policy(policy_dir / "policy.json", doc)))
        c = Client(f"localhost:{handle.port}", env.ca)
        try:
            assert c.get(ev1, ["k"]) == ("1", {"k": value.encode()})
        finally:
            c.close()
            handle.stop(0)
        # without the CA the same Vault is not trusted: the KMS is unusable, never silently insecure
        del doc["ca_file"]
        handle = asps_server.serve(env.config(write_policy(policy_dir / "policy-noca.json", doc)))
        c = Client(f"localhost:{handle.port}", env.ca)
        try:
            err = c.refused(c.request(ev1, ["k"])[0])
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED), (
                err.details()
            )
        finally:
            c.close()
            handle.stop(0)


def test_zz_no_secret_or_token_in_any_log_line(logs, tokens):
    audit = logs.audit()
    assert {a["status"] for a in audit} >= {"OK", "NOT_FOUND", "PERMISSION_DENIED", "UNAVAILABLE"}
    assert_no_secret_in(logs.lines, [*VALUES.values(), OTHER_FIELD, *tokens.values()])
