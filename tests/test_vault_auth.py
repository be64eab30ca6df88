"""Vault/OpenBao logins a deployer can run in production, against a real OpenBao: AppRole (role_id and
secret_id files) and TLS certificate auth, token renewal at half TTL across several short TTLs, a
fresh login after the token's max TTL or a revocation, and configuration errors reaching the enclave
as FAILED_PRECONDITION. No token or secret_id may appear in a log line.
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
    assert_no_secret_in,
    captured_logs,
    module_client,
    module_env,
    module_ev1,
    module_logs,
    write_policy,
)
from openbao import OpenBao, throwaway_pki

import asps_server
import kms
import policy

VALUES = {"1": {"image_key": secrets.token_hex(16)}, "2": {"image_key": secrets.token_hex(16)}}


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory):
    server = OpenBao(tmp_path_factory.mktemp("bao-auth"))
    try:
        server.start()
        server.request("POST", "sys/auth/approle", {"type": "approle"})
        for app, values in VALUES.items():
            server.add_app(app, values, kv_version=1)
        yield server
    finally:
        server.close()


def approle(bao: OpenBao, app: str, where: Path, *, ttl: str = "1h", max_ttl: str = "2h") -> dict[str, str]:
    """Role app<app> bound to the app's read-only policy; role_id/secret_id written to 0600 files.
    Returns the policy's 'auth' object (file names) and, under '_values', what no log may show."""
    role = f"auth/approle/role/app{app}"
    bao.request("POST", role, {"token_policies": [f"app{app}"], "token_ttl": ttl, "token_max_ttl": max_ttl})
    role_id = bao.request("GET", f"{role}/role-id")["data"]["role_id"]
    secret_id = bao.request("POST", f"{role}/secret-id")["data"]["secret_id"]
    where.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, value in (("role_id", role_id), ("secret_id", secret_id)):
        path = where / f"app{app}_{name}"
        path.write_text(value + "\n")
        path.chmod(0o600)
        files[f"{name}_file"] = str(path)
    return {"method": "approle", **files, "_values": f"{role_id} {secret_id}"}


def login_of(auth: dict[str, str]) -> kms.AppRoleLogin:
    return kms.AppRoleLogin(auth["role_id_file"], auth["secret_id_file"])


# --- AppRole ---------------------------------------------------------------------------------------


def test_approle_login_reads_and_keeps_reading_across_several_short_ttls(
    bao: OpenBao, tmp_path: Path
) -> None:
    auth = approle(bao, "1", tmp_path, ttl="2s", max_ttl="5s")
    agent = kms.VaultAgent(bao.addr, auth=login_of(auth))
    assert agent.auth_method == "approle" and "secret" not in repr(agent)
    seen_tokens: set[str] = set()
    with captured_logs() as logs:
        end = time.monotonic() + 11  # a few TTLs and at least two max TTLs
        reads = 0
        while time.monotonic() < end:
            assert agent.get("occlum/1/image_key") == VALUES["1"]["image_key"].encode()
            seen_tokens.add(agent._token or "")
            reads += 1
            time.sleep(0.25)
    text = "\n".join(logs.lines)
    logins = text.count("approle login to")
    assert logins >= 3, f"max TTL 5s over 11s of reads needs fresh logins; log:\n{text}"
    assert "renewed the approle token" in text, "tokens are renewed before max TTL forces a login"
    assert len(seen_tokens) >= 3
    assert_no_secret_in(logs.lines, [*auth["_values"].split(), *seen_tokens])


def test_revoked_token_is_replaced_by_a_fresh_login(bao: OpenBao, tmp_path: Path) -> None:
    auth = approle(bao, "2", tmp_path)
    agent = kms.VaultAgent(bao.addr, auth=login_of(auth))
    assert agent.get("occlum/2/image_key") == VALUES["2"]["image_key"].encode()
    first = agent._token
    with captured_logs() as logs:
        # an operator revokes every token AppRole logins made (e.g. after a leak)
        bao.request("PUT", "sys/leases/revoke-prefix/auth/approle/login")
        assert agent.get("occlum/2/image_key") == VALUES["2"]["image_key"].encode()
    assert agent._token != first
    assert any("logging in again" in line for line in logs.lines)
    assert_no_secret_in(logs.lines, [*auth["_values"].split(), first or "", agent._token or ""])


def test_approle_refusals(bao: OpenBao, tmp_path: Path) -> None:
    auth = approle(bao, "1", tmp_path)
    # app 1's role cannot read app 2's secrets: a refusal, not a dead token
    agent = kms.VaultAgent(bao.addr, auth=login_of(auth))
    with pytest.raises(kms.KmsDenied) as info:
        agent.get("occlum/2/image_key")
    assert not info.value.token_invalid
    # a wrong secret_id: the login is refused
    Path(auth["secret_id_file"]).write_text("0c9f2ad6-0000-0000-0000-000000000000\n")
    with pytest.raises(kms.KmsDenied, match="refused the approle login") as info:
        kms.VaultAgent(bao.addr, auth=login_of(auth)).get("occlum/1/image_key")
    assert "0c9f2ad6" not in str(info.value)
    # a missing file at request time is a configuration error
    Path(auth["secret_id_file"]).unlink()
    with pytest.raises(kms.KmsConfigError, match="secret_id file"):
        kms.VaultAgent(bao.addr, auth=login_of(auth)).get("occlum/1/image_key")
    with pytest.raises(kms.KmsConfigError, match="either a token or a login"):
        kms.VaultAgent(bao.addr, "s.x", auth=login_of(auth))
    with pytest.raises(kms.KmsConfigError, match="https"):
        kms.VaultAgent(bao.addr, auth=kms.CertLogin("c.pem", "k.pem"))


# --- the server with AppRole: secrets flow, and a configuration error is FAILED_PRECONDITION --------


def approle_policy(bao: OpenBao, auth1: dict[str, str], auth2: dict[str, str]) -> dict:
    return {
        "kms": "vault",
        "addr": bao.addr,
        "auth_method": "approle",
        "app_list": [
            {
                "id": 1,
                "mr_enclave": ENCLAVE_1.hex(),
                "auth": {k: v for k, v in auth1.items() if k != "_values"},
                "secrets": {"master_key": "occlum/1/image_key"},
            },
            {
                "id": 2,
                "mr_enclave": ENCLAVE_2.hex(),
                "auth": {k: v for k, v in auth2.items() if k != "_values"},
                "secrets": {"master_key": "occlum/2/image_key"},
            },
        ],
    }


@pytest.fixture(scope="module")
def creds(bao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    where = tmp_path_factory.mktemp("creds")
    return {"1": approle(bao, "1", where / "1", ttl="3s", max_ttl="6s"), "2": approle(bao, "2", where / "2")}


@pytest.fixture(scope="module")
def server(env, bao, creds):
    path = write_policy(env.tmp / "policy_approle.json", approle_policy(bao, creds["1"], creds["2"]))
    handle = asps_server.serve(env.config(path))
    yield handle
    handle.stop(0)


def test_server_reads_with_approle_and_config_error_is_failed_precondition(
    client, ev1, bao, creds, logs
) -> None:
    for _ in range(3):
        app, got = client.get(ev1)
        assert (app, got) == ("1", {"master_key": VALUES["1"]["image_key"].encode()})
        time.sleep(1.5)  # past half the 3 s TTL: renewed between requests
    secret_id_file = Path(creds["1"]["secret_id_file"])
    kept = secret_id_file.read_bytes()
    secret_id_file.unlink()
    try:
        bao.request("PUT", "sys/leases/revoke-prefix/auth/approle/login")
        req, _ = client.request(ev1, ["master_key"])
        err = client.refused(req)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "configuration" in err.details()
    finally:
        secret_id_file.write_bytes(kept)
        secret_id_file.chmod(0o600)
    app, got = client.get(ev1)  # fixed by the operator: served again without a restart
    assert got == {"master_key": VALUES["1"]["image_key"].encode()}
    secret_ids = [v for c in creds.values() for v in c["_values"].split()]
    assert_no_secret_in(logs.lines, [*secret_ids, VALUES["1"]["image_key"]])


def test_classify_maps_config_errors_to_failed_precondition() -> None:
    refusal = asps_server.classify(kms.KmsConfigError("secret reference: bad"), "fetch")
    assert refusal.kind is asps_server.Kind.CONFIG
    assert refusal.status == grpc.StatusCode.FAILED_PRECONDITION
    assert asps_server.classify(kms.KmsUnavailable("down"), "fetch").status == grpc.StatusCode.UNAVAILABLE


# --- TLS certificate auth ----------------------------------------------------------------------------


def client_cert(where: Path, cn: str) -> tuple[Path, Path, Path]:
    """A client CA and a client certificate (clientAuth) it signed: (ca.pem, cert.pem, key.pem)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca, cert, key = throwaway_pki(f"{cn} client CA", cn, ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    where.mkdir(parents=True, exist_ok=True)
    paths = (where / "client-ca.pem", where / "client.pem", where / "client.key")
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


def test_cert_auth_over_tls(tmp_path: Path) -> None:
    with OpenBao(tmp_path / "bao-tls", tls=True) as tls_bao:
        tls_bao.add_app(1, {"image_key": "cert-auth-value"})
        tls_bao.request("POST", "sys/auth/cert", {"type": "cert"})
        ca, cert, key = client_cert(tmp_path / "client", "asps-app1")
        tls_bao.request(
            "POST",
            "auth/cert/certs/app1",
            {
                "certificate": ca.read_text(),
                "token_policies": ["app1"],
                "token_ttl": "2s",
                "token_max_ttl": "4s",
            },
        )
        agent = kms.VaultAgent(
            tls_bao.addr, auth=kms.CertLogin(str(cert), str(key), name="app1"), ca_file=tls_bao.ca_file
        )
        with captured_logs() as logs:
            end = time.monotonic() + 6
            while time.monotonic() < end:
                assert agent.get("occlum/1/image_key") == b"cert-auth-value"
                time.sleep(0.3)
        assert sum("cert login to" in line for line in logs.lines) >= 2, "a fresh login past max TTL"
        assert_no_secret_in(logs.lines, [agent._token or "", "cert-auth-value"])

        # a certificate the cert role does not trust is refused at login
        _, other_cert, other_key = client_cert(tmp_path / "other", "intruder")
        intruder = kms.VaultAgent(
            tls_bao.addr, auth=kms.CertLogin(str(other_cert), str(other_key)), ca_file=tls_bao.ca_file
        )
        with pytest.raises(kms.KmsDenied, match="refused the cert login"):
            intruder.get("occlum/1/image_key")

        # the policy form of the same login loads, and refuses cert auth over plain http
        doc = {
            "kms": "vault",
            "addr": tls_bao.addr,
            "ca_file": tls_bao.ca_file,
            "app_list": [
                {
                    "id": 1,
                    "mr_enclave": "ab" * 32,
                    "auth": {"method": "cert", "cert_file": str(cert), "key_file": str(key), "name": "app1"},
                    "secrets": {"k": "occlum/1/image_key"},
                }
            ],
        }
        pol = policy.parse_policy(doc)
        assert pol.apps[0].fetch(["k"]) == {"k": b"cert-auth-value"}
        doc["addr"] = "http://127.0.0.1:1"
        doc.pop("ca_file")
        with pytest.raises(policy.PolicyError, match="app 1: field 'auth': cert auth needs https"):
            policy.parse_policy(doc)


# --- policy schema --------------------------------------------------------------------------------


def test_policy_auth_schema_refusals(tmp_path: Path) -> None:
    (tmp_path / "role_id").write_text("role\n")
    (tmp_path / "secret_id").write_text("sid\n")
    (tmp_path / "secret_id").chmod(0o644)

    def doc(auth: object, **app: object) -> dict:
        return {
            "kms": "vault",
            "addr": "http://127.0.0.1:8200",
            "app_list": [{"id": 7, "mr_enclave": "ab" * 32, "auth": auth, "secrets": {"k": "m/p"}, **app}],
        }

    def refused(d: dict) -> str:
        with pytest.raises(policy.PolicyError) as e:
            policy.parse_policy(d, base_dir=tmp_path)
        return str(e.value)

    good = {"method": "approle", "role_id_file": "role_id", "secret_id_file": "secret_id"}
    pol = policy.parse_policy(doc(good), base_dir=tmp_path)
    assert any("secret_id" in w and "chmod 600" in w for w in pol.warnings)
    inline = refused(doc({**good, "secret_id": "s3cr3t-inline-value"}))
    assert "app 7: field 'auth.secret_id'" in inline and "never written inline" in inline
    assert "s3cr3t-inline-value" not in inline
    assert "app 7: field 'auth.secret_id_file'" in refused(doc({**good, "secret_id_file": "missing"}))
    assert "unknown field" in refused(doc({**good, "bogus": 1}))
    assert "not both" in refused(doc(good, app_token="s.real-looking"))
    assert "'auth.method'" in refused(doc({"method": "kerberos"}))
    assert "goes in 'app_token'" in refused(doc({"method": "token"}))
    assert "'auth.mount'" in refused(doc({**good, "mount": "../x"}))
    missing = doc(None)
    del missing["app_list"][0]["auth"]
    missing["auth_method"] = "approle"
    assert "app 7: field 'auth' is missing" in refused(missing)


def test_concurrent_reads_share_one_login_across_renewals(bao: OpenBao, tmp_path: Path) -> None:
    import concurrent.futures

    auth = approle(bao, "2", tmp_path, ttl="2s", max_ttl="4s")
    agent = kms.VaultAgent(bao.addr, auth=login_of(auth))
    end = time.monotonic() + 6

    def reader() -> int:
        reads = 0
        while time.monotonic() < end:
            assert agent.get("occlum/2/image_key") == VALUES["2"]["image_key"].encode()
            reads += 1
            time.sleep(0.05)
        return reads

    with captured_logs() as logs, concurrent.futures.ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(lambda _: reader(), range(4)))
    assert all(counts), counts
    logins = sum("approle login to" in line for line in logs.lines)
    # one login per max TTL (4 s) plus renewals, not one per thread or per read
    assert 1 <= logins <= 6 < sum(counts), "\n".join(logs.lines[-20:])
    assert_no_secret_in(logs.lines, auth["_values"].split())
