"""The service over real gRPC and TLS with real sim quotes and the JSON KMS, plus each server step alone.

Every refusal is checked for its status and reason, and followed by a request that succeeds: the
server keeps serving. The module ends by searching every log line it produced for every secret.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import struct
import subprocess
import sys
import time

import grpc
import pytest
from asps_testkit import (  # noqa: F401  (fixtures: env, ev1, logs)
    ENCLAVE_1,
    ENCLAVE_2,
    ENCLAVE_UNKNOWN,
    Client,
    assert_no_secret_in,
    forged_certificate,
    module_env,
    module_ev1,
    module_logs,
    new_p256,
    plain_certificate,
    write_policy,
)
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asps_client
import asps_pb2
import asps_server
import asps_wire
import kms
import secretmanager_pb2
import secretmanager_pb2_grpc

ENCLAVE_LENIENT = hashlib.sha256(b"ASPS test enclave lenient").digest()
TOKEN_KEY = b"test token key, 32 bytes long!!!"
VALUES = {
    name: f"{name}-{secrets.token_hex(12)}" for name in ("a1_master", "a1_other", "a2_master", "a2_only", "l")
}


def policy_doc() -> dict:
    return {
        "kms": "none",
        "app_list": [
            {
                "id": "app1",
                "mr_enclave": ENCLAVE_1.hex(),
                "secrets": {"master_key": VALUES["a1_master"], "secret1": VALUES["a1_other"]},
            },
            {
                "id": "app2",
                "mr_enclave": ENCLAVE_2.hex(),
                "secrets": {"master_key": VALUES["a2_master"], "app2_only": VALUES["a2_only"]},
            },
            {
                "id": "lenient",
                "mr_enclave": ENCLAVE_LENIENT.hex(),
                "allow_debug": True,
                "allowed_tcb_statuses": ["UpToDate", "OutOfDate"],
                "secrets": {"master_key": VALUES["l"]},
            },
        ],
    }


@pytest.fixture(scope="module")
def server(env):
    policy = write_policy(env.tmp / "policy.json", policy_doc())
    handle = asps_server.serve(env.config(policy, token_keys=(TOKEN_KEY,)))
    yield handle
    handle.stop(0)


@pytest.fixture(scope="module")
def client(server, env):
    c = Client(f"127.0.0.1:{server.port}", env.ca)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ev2(env):
    return env.evidence(ENCLAVE_2)


def still_serving(client: Client, ev1) -> None:
    app, got = client.get(ev1, ["master_key"])
    assert (app, got) == ("app1", {"master_key": VALUES["a1_master"].encode()})


def assert_refused(err: grpc.RpcError, status: grpc.StatusCode, *phrases: str) -> None:
    assert err.code() == status, (err.code(), err.details())
    for p in phrases:
        assert p in err.details(), (p, err.details())


# --- protocol pieces ---------------------------------------------------------------------------------


def test_transcript_bytes_exactly_as_documented():
    token, evidence, names = b"\x01tok", b"cert-der", ["master_key", "é"]
    expected = (
        b"asps/v1 get-secrets"
        + b"\x00\x00\x00\x04\x01tok"
        + hashlib.sha256(b"cert-der").digest()
        + b"\x00\x00\x00\x02"
        + b"\x00\x00\x00\x0amaster_key"
        + b"\x00\x00\x00\x02\xc3\xa9"
    )
    assert asps_wire.transcript(token, evidence, names) == expected
    assert asps_server.transcript(token, evidence, names) == expected
    assert asps_server.transcript(b"", b"", []) == b"asps/v1 get-secrets" + bytes(4) + hashlib.sha256(
        b""
    ).digest() + bytes(4)


def test_token_book_single_use_expiry_foreign_key_and_rotation():
    now = [1_000_000.0]
    book = asps_server.TokenBook([b"k" * 32], ttl=60, clock=lambda: now[0])
    token, exp = book.mint()
    assert exp == 1_000_060 and len(token) == asps_server.TOKEN_BYTES
    assert struct.unpack(">Q", token[17:25])[0] == exp
    book.redeem(token)
    with pytest.raises(asps_server.Refusal, match="already used") as e:
        book.redeem(token)
    assert e.value.status == grpc.StatusCode.UNAUTHENTICATED
    late, _ = book.mint()
    now[0] += 60
    with pytest.raises(asps_server.Refusal, match="expired"):
        book.redeem(late)
    other = asps_server.TokenBook([b"o" * 32], clock=lambda: now[0])
    with pytest.raises(asps_server.Refusal, match="not issued by this service"):
        book.redeem(other.mint()[0])
    forged = bytearray(book.mint()[0])
    forged[20] ^= 1  # extend the expiry: the MAC no longer matches
    with pytest.raises(asps_server.Refusal, match="not issued by this service"):
        book.redeem(bytes(forged))
    with pytest.raises(asps_server.Refusal, match="malformed"):
        book.redeem(b"\x01" * 10)
    # rotation: a replica with (new, old) keys accepts tokens of the old key and mints with the new one
    rotated = asps_server.TokenBook([b"n" * 32, b"k" * 32], clock=lambda: now[0])
    rotated.redeem(book.mint()[0])
    with pytest.raises(asps_server.Refusal, match="not issued"):
        book.redeem(rotated.mint()[0])


def test_token_book_replay_cache_is_bounded_and_forgets_expired():
    now = [2_000_000.0]
    book = asps_server.TokenBook([b"k" * 32], ttl=10, cache_size=3, clock=lambda: now[0])
    for _ in range(3):
        book.redeem(book.mint()[0])
    pending = book.mint()[0]
    with pytest.raises(asps_server.Refusal, match="too many") as e:
        book.redeem(pending)
    assert e.value.status == grpc.StatusCode.UNAVAILABLE  # refuse rather than forget a nonce
    now[0] += 10
    book.redeem(book.mint()[0])  # expired nonces were swept
    assert len(book) == 1


def test_sealing_suites_and_rsa_refusal():
    for curve, size in ((ec.SECP256R1(), 65), (ec.SECP384R1(), 97)):
        key = ec.generate_private_key(curve)
        suite = asps_server.sealing_suite(key.public_key())
        sealed = asps_server.seal(suite, key.public_key(), {"n": b"v"}, b"tok")
        assert len(sealed) > size  # enc (uncompressed point) || ciphertext
        assert asps_client.open_bundle(key, sealed, b"tok") == {"n": b"v"}
        with pytest.raises(asps_client.BadReply):
            asps_client.open_bundle(key, sealed, b"other token")  # info binds the token
    rsa_key = rsa.generate_private_key(65537, 2048)
    with pytest.raises(asps_server.Refusal, match="RSA evidence keys cannot receive sealed secrets") as e:
        asps_server.sealing_suite(rsa_key.public_key())
    assert e.value.status == grpc.StatusCode.INVALID_ARGUMENT


def test_steps_without_grpc(server, env, ev1):
    """The pipeline's functions called directly, as the module docstring promises."""
    der = asps_server.evidence_der(ev1.cert_der)
    token = b"t" * asps_server.TOKEN_BYTES
    sig = asps_wire.sign_transcript(ev1.private_key, asps_wire.transcript(token, der, []))
    key = asps_server.check_signature(der, token, [], sig)
    ident = asps_server.verify_evidence(der, server.provisioner.verifier)
    grant = asps_server.decide(server.provisioner.policy, ident, [])
    assert grant.app.id == "app1" and grant.names == ("master_key", "secret1")
    values = asps_server.fetch(grant)
    sealed = asps_server.seal(asps_server.sealing_suite(key), key, values, token)
    assert asps_client.open_bundle(ev1.private_key, sealed, token)["secret1"] == VALUES["a1_other"].encode()
    # PEM evidence hashes as its DER
    assert asps_server.evidence_der(asps_client.ratls_attest.cert_to_pem(ev1.cert_der)) == der


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, data: bytes) -> bytes:  # protobuf wire type 2 (length-delimited)
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _parse(data: bytes) -> list[tuple[int, bytes | int]]:
    """Fields of a protobuf message in order: varints as int, length-delimited as bytes."""
    out: list[tuple[int, bytes | int]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        value, pos = _read_varint(data, pos)
        if key & 7 == 2:
            out.append((key >> 3, data[pos : pos + value]))
            pos += value
        else:
            assert key & 7 == 0, "only varint and length-delimited fields expected"
            out.append((key >> 3, value))
    return out


def test_readme_protocol_is_enough_for_an_independent_client(server, env, ev1):
    """A client written from the README alone: raw protobuf bytes, hand-built transcript, HPKE."""
    from cryptography.hazmat.primitives import hashes, hpke

    channel = grpc.secure_channel(f"localhost:{server.port}", grpc.ssl_channel_credentials(env.ca))
    try:
        challenge = channel.unary_unary("/asps.v1.SecretProvision/GetChallenge")(b"", timeout=10)
        fields = dict(_parse(challenge))
        token = fields[1]
        assert 0 < fields[2] - time.time() <= 61  # expires_at, unix seconds
        names = ["secret1", "master_key"]
        transcript = b"asps/v1 get-secrets" + len(token).to_bytes(4, "big") + token
        transcript += hashlib.sha256(ev1.cert_der).digest() + len(names).to_bytes(4, "big")
        for n in names:
            transcript += len(n.encode()).to_bytes(4, "big") + n.encode()
        signature = ev1.private_key.sign(transcript, ec.ECDSA(hashes.SHA256()))
        request = _field(1, ev1.cert_der) + _field(2, token) + b"".join(_field(3, n.encode()) for n in names)
        request += _field(4, signature)
        reply = dict(_parse(channel.unary_unary("/asps.v1.SecretProvision/GetSecrets")(request, timeout=10)))
    finally:
        channel.close()
    assert reply[1] == b"app1"
    suite = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    sealed = reply[2]
    bundle = suite.decrypt(sealed, ev1.private_key, info=b"asps/v1 sealed-secrets" + token)
    entries = {}
    for num, entry in _parse(bundle):
        assert num == 1
        kv = dict(_parse(entry))
        entries[kv[1].decode()] = kv[2]
    assert entries == {"secret1": VALUES["a1_other"].encode(), "master_key": VALUES["a1_master"].encode()}
    # enc is the uncompressed ephemeral point (65 bytes for P-256), then the AES-256-GCM ciphertext + tag
    assert sealed[0] == 4 and len(sealed) == 65 + len(bundle) + 16


# --- end to end --------------------------------------------------------------------------------------


def test_health_serving(server, client):
    stub = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "asps.v1.SecretProvision"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    legacy = stub.Check(health_pb2.HealthCheckRequest(service="secretmanager.SecretManger"), timeout=5)
    assert legacy.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_each_enclave_gets_its_own_secrets(client, ev1, ev2):
    assert client.get(ev1) == (
        "app1",
        {"master_key": VALUES["a1_master"].encode(), "secret1": VALUES["a1_other"].encode()},
    )
    assert client.get(ev2, ["app2_only"]) == ("app2", {"app2_only": VALUES["a2_only"].encode()})
    assert client.get(ev2, ["master_key"]) == ("app2", {"master_key": VALUES["a2_master"].encode()})


def test_client_library_and_p384_and_pem_evidence(server, env):
    got = asps_client.get_secrets(
        f"localhost:{server.port}",
        ca=env.ca,
        names=["master_key"],
        provider="sim",
        provider_options={"sim_dir": str(env.sim.directory)},
        key_type="p384",
    )
    assert got == {"master_key": VALUES["a1_master"].encode()}
    ev = env.evidence(ENCLAVE_1, key_type="p384", fmt="gramine")
    c = Client(f"127.0.0.1:{server.port}", env.ca)
    try:
        pem = asps_client.ratls_attest.cert_to_pem(ev.cert_der)
        assert c.get(ev, ["secret1"], evidence_bytes=pem) == (
            "app1",
            {"secret1": VALUES["a1_other"].encode()},
        )
    finally:
        c.close()


def test_app1_cannot_obtain_app2_secrets(client, ev1):
    req, _ = client.request(ev1, ["app2_only"])
    err = client.refused(req)
    assert_refused(err, grpc.StatusCode.NOT_FOUND, "'app2_only' is not granted to this enclave")
    assert "app2" not in err.details().replace("'app2_only'", "")  # nothing about who has it
    req, _ = client.request(ev1, ["master_key", "nonexistent"])
    assert_refused(client.refused(req), grpc.StatusCode.NOT_FOUND, "'nonexistent'")
    still_serving(client, ev1)


def test_concurrent_enclaves_each_get_their_own(server, env, ev1, ev2):
    from concurrent.futures import ThreadPoolExecutor

    expected = {
        "app1": {"master_key": VALUES["a1_master"].encode()},
        "app2": {"master_key": VALUES["a2_master"].encode()},
    }

    def attest(i: int) -> tuple[str, dict[str, bytes]]:
        c = Client(f"127.0.0.1:{server.port}", env.ca)
        try:
            return c.get(ev1 if i % 2 else ev2, ["master_key"])
        finally:
            c.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(attest, range(40)))
    assert all(got == expected[app] for app, got in results)
    assert sorted(app for app, _ in results) == ["app1"] * 20 + ["app2"] * 20


# --- refusals, each followed by a successful request ---------------------------------------------------


def test_replayed_token(client, ev1):
    req, _ = client.request(ev1, ["master_key"])
    client.stub.GetSecrets(req, timeout=10)
    assert_refused(client.refused(req), grpc.StatusCode.UNAUTHENTICATED, "token", "already used")
    still_serving(client, ev1)


def test_token_from_a_server_with_another_key(client, ev1):
    foreign = asps_server.TokenBook([b"another server's key, 32 bytes!"]).mint()[0]
    req, _ = client.request(ev1, ["master_key"], token=foreign)
    assert_refused(client.refused(req), grpc.StatusCode.UNAUTHENTICATED, "not issued by this service")
    still_serving(client, ev1)


def test_expired_token(client, ev1):
    # minted with the server's own key two minutes ago: authentic, but stale
    old = asps_server.TokenBook([TOKEN_KEY], ttl=60, clock=lambda: time.time() - 120).mint()[0]
    req, _ = client.request(ev1, ["master_key"], token=old)
    assert_refused(client.refused(req), grpc.StatusCode.UNAUTHENTICATED, "token expired")
    still_serving(client, ev1)


def test_signature_by_another_key(client, ev1):
    req, _ = client.request(ev1, ["master_key"], signer=new_p256())
    assert_refused(client.refused(req), grpc.StatusCode.UNAUTHENTICATED, "signature does not verify")
    still_serving(client, ev1)


def test_evidence_of_a_signed_with_key_of_b(client, ev1, ev2):
    # A's certificate, B's signature over it
    req, _ = client.request(ev1, ["master_key"], signer=ev2.private_key)
    assert_refused(client.refused(req), grpc.StatusCode.UNAUTHENTICATED, "signature does not verify")
    # A's quote in a certificate for B's key, correctly signed by B: the quote does not bind B's key
    forged = asps_client.Evidence(forged_certificate(ev1.cert_der, ev2.private_key), ev2.private_key)
    req, _ = client.request(forged, ["master_key"])
    err = client.refused(req)
    assert_refused(err, grpc.StatusCode.UNAUTHENTICATED, "evidence rejected")
    still_serving(client, ev1)


def test_signature_over_other_names(client, ev1):
    token = client.challenge()
    sig = asps_wire.sign_transcript(
        ev1.private_key, asps_wire.transcript(token, ev1.cert_der, ["secret1"])
    )
    req = asps_pb2.SecretsRequest(evidence=ev1.cert_der, token=token, names=["master_key"], signature=sig)
    assert_refused(client.refused(req), grpc.StatusCode.UNAUTHENTICATED, "signature")
    still_serving(client, ev1)


def test_debug_enclave(client, env, ev1):
    ev = env.evidence(ENCLAVE_1, debug=True)
    req, _ = client.request(ev, ["master_key"])
    assert_refused(client.refused(req), grpc.StatusCode.PERMISSION_DENIED, "debug enclave refused", "app1")
    # the same debug build is fine for an app that allows it
    assert client.get(env.evidence(ENCLAVE_LENIENT, debug=True))[0] == "lenient"
    still_serving(client, ev1)


def test_out_of_date_tcb_when_not_allowed(client, env, ev1):
    ev = env.evidence(ENCLAVE_1, tcb="OutOfDate")
    req, _ = client.request(ev, ["master_key"])
    assert_refused(client.refused(req), grpc.StatusCode.PERMISSION_DENIED, "TCB status OutOfDate not allowed")
    assert client.get(env.evidence(ENCLAVE_LENIENT, tcb="OutOfDate"))[0] == "lenient"
    still_serving(client, ev1)


def test_unknown_enclave(client, env, ev1):
    ev = env.evidence(ENCLAVE_UNKNOWN)
    req, _ = client.request(ev, [])
    assert_refused(
        client.refused(req), grpc.StatusCode.PERMISSION_DENIED, "unknown enclave", ENCLAVE_UNKNOWN.hex()
    )
    still_serving(client, ev1)


def test_rsa_evidence_key_refused_clearly(client, env, ev1):
    ev = env.evidence(ENCLAVE_1, key_type="rsa3072")
    req, _ = client.request(ev, ["master_key"])
    assert_refused(client.refused(req), grpc.StatusCode.INVALID_ARGUMENT, "RSA evidence keys cannot receive")
    still_serving(client, ev1)


def test_legacy_service_when_not_enabled(client, ev1):
    stub = secretmanager_pb2_grpc.SecretMangerStub(client.channel)
    ctx = asps_client.ratls_attest.cert_to_pem(ev1.cert_der).decode()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSecret(secretmanager_pb2.SecretRequest(key="master_key", ctx=ctx), timeout=10)
    assert_refused(
        e.value, grpc.StatusCode.UNIMPLEMENTED, "legacy cczoo protocol is disabled", "--legacy-cczoo"
    )
    still_serving(client, ev1)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"token": b""}, "'token' is empty"),
        ({"token": b"x" * 129}, "'token' exceeds"),
        ({"evidence": b""}, "'evidence' is empty"),
        ({"evidence": b"\x30\x03\x02\x01\x00"}, "not an X.509 certificate"),
        (
            {"evidence": b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"},
            "not an X.509",
        ),
        ({"evidence": b"x" * (64 * 1024 + 1)}, "'evidence' exceeds"),
        ({"signature": b""}, "'signature' is empty"),
        ({"signature": b"s" * 1025}, "'signature' exceeds"),
        ({"names": ["n"] * 65}, "more than 64"),
        ({"names": ["x" * 257]}, "1..256 bytes"),
        ({"names": [""]}, "1..256 bytes"),
        ({"names": ["master_key", "master_key"]}, "repeats"),
    ],
)
def test_malformed_fields_are_invalid_argument(client, ev1, change, phrase):
    req, _ = client.request(ev1, ["master_key"])
    for k, v in change.items():
        if k == "names":
            del req.names[:]
            req.names.extend(v)
        else:
            setattr(req, k, v)
    assert_refused(client.refused(req), grpc.StatusCode.INVALID_ARGUMENT, phrase)
    still_serving(client, ev1)


def test_oversized_message_refused_by_size(client, ev1):
    req, _ = client.request(ev1, ["master_key"])
    req.evidence = b"x" * (300 * 1024)
    err = client.refused(req)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(client, ev1)


def test_certificate_with_invalid_version_is_invalid_argument(client, ev1):
    key = new_p256()
    der = plain_certificate(key)
    v3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2 (v3)
    bad = der.replace(v3, bytes.fromhex("a003020105"), 1)
    assert bad != der
    req, _ = client.request(asps_client.Evidence(bad, key), ["master_key"])
    assert_refused(client.refused(req), grpc.StatusCode.INVALID_ARGUMENT, "not an X.509 certificate")
    still_serving(client, ev1)


def test_certificate_without_quote_is_unauthenticated(client, ev1):
    key = new_p256()
    plain = asps_client.Evidence(plain_certificate(key), key)
    req, _ = client.request(plain, ["master_key"])
    assert_refused(client.refused(req), grpc.StatusCode.UNAUTHENTICATED, "evidence rejected")
    still_serving(client, ev1)


# --- hostile input never reaches INTERNAL -------------------------------------------------------------

ALLOWED_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def mutate(data: bytes, positions: list[int], flips: list[int]) -> bytes:
    out = bytearray(data)
    for p, f in zip(positions, flips, strict=False):
        out[p % len(out)] ^= f or 1
    return bytes(out)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    evidence_kind=st.sampled_from(["random", "mutated", "truncated", "valid"]),
    blob=st.binary(max_size=2048),
    positions=st.lists(st.integers(min_value=0), max_size=6),
    flips=st.lists(st.integers(min_value=0, max_value=255), max_size=6),
    token_kind=st.sampled_from(["fresh", "random", "mutated"]),
    names=st.lists(st.text(max_size=40), max_size=5),
    signature=st.binary(max_size=200),
    sign=st.booleans(),
)
def test_fuzzed_requests_get_documented_statuses_only(
    client, ev1, evidence_kind, blob, positions, flips, token_kind, names, signature, sign
):
    evidence = {
        "random": blob,
        "mutated": mutate(ev1.cert_der, positions, flips),
        "truncated": ev1.cert_der[: len(blob) % len(ev1.cert_der)],
        "valid": ev1.cert_der,
    }[evidence_kind]
    token = client.challenge()
    if token_kind == "random":
        token = blob[:100]
    elif token_kind == "mutated":
        token = mutate(token, positions, flips)
    if sign:
        signature = asps_wire.sign_transcript(
            ev1.private_key, asps_wire.transcript(token, evidence, names)
        )
    req = asps_pb2.SecretsRequest(evidence=evidence, token=token, names=names, signature=signature)
    try:
        client.stub.GetSecrets(req, timeout=10)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED_REFUSALS, (e.code(), e.details())
        assert e.details()


def test_unusual_key_types_are_refused_not_crashed(client, ev1):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    import datetime

    from cryptography import x509

    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "ed")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .public_key(key.public_key())
        .sign(key, None)
    )
    from cryptography.hazmat.primitives import serialization

    der = cert.public_bytes(serialization.Encoding.DER)
    token = client.challenge()
    req = asps_pb2.SecretsRequest(evidence=der, token=token, names=[], signature=key.sign(b"x"))
    # the key type is checked before the signature (it could never receive sealed secrets)
    assert_refused(client.refused(req), grpc.StatusCode.INVALID_ARGUMENT, "cannot receive sealed secrets")
    still_serving(client, ev1)


def test_reflection_only_when_asked(env):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    policy = write_policy(env.tmp / "policy-refl.json", policy_doc())
    for enabled in (False, True):
        handle = asps_server.serve(env.config(policy, reflection=enabled))
        channel = grpc.secure_channel(f"localhost:{handle.port}", grpc.ssl_channel_credentials(env.ca))
        try:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            if enabled:
                reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
                names = {s.name for s in reply.list_services_response.service}
                assert "asps.v1.SecretProvision" in names
            else:
                with pytest.raises(grpc.RpcError) as e:
                    next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            channel.close()
            handle.stop(0)


def test_client_imports_no_server_code(repo_dir):
    code = (
        "import sys, asps_client; "
        "bad = {'asps_server', 'policy', 'kms', 'sgxsim', 'requests'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=repo_dir, check=True)


# --- legacy protocol and startup --------------------------------------------------------------------


def test_legacy_round_trip_with_original_message_shapes(env, ev1, ev2, capsys, logs):
    (env.tmp / "legacy-secrets.json").write_text(
        json.dumps({"m": VALUES["a1_master"], "o": VALUES["a1_other"], "a2": VALUES["a2_only"]})
    )
    doc = policy_doc()
    doc["secrets_file"] = "legacy-secrets.json"  # the JSON backend's separate-file form
    doc["app_list"][0]["secrets"] = {"master_key": "m", "secret1": "o"}
    doc["app_list"][1]["secrets"] = {"app2_only": "a2"}
    doc["app_list"][2]["secrets"] = {"master_key": "m"}
    policy = write_policy(env.tmp / "policy-legacy.json", doc)
    handle = asps_server.serve(env.config(policy, legacy_cczoo=True))
    assert any("--legacy-cczoo" in ln and "REPLAYABLE" in ln for ln in logs.lines)  # warned at start
    # app1 also gets a binary secret (JSON files hold text only, so it is put in directly)
    pol = handle.provisioner.policy
    app1 = dataclasses.replace(
        pol.apps[0],
        paths={**pol.apps[0].paths, "binary": "bin"},
        agent=kms.JsonAgent({"m": VALUES["a1_master"], "o": VALUES["a1_other"], "bin": b"\xff\xfe"}),
    )
    handle.provisioner.policy = dataclasses.replace(pol, apps=(app1, *pol.apps[1:]))
    channel = grpc.secure_channel(f"localhost:{handle.port}", grpc.ssl_channel_credentials(env.ca))
    try:
        stub = secretmanager_pb2_grpc.SecretMangerStub(channel)
        # the original sends the PEM certificate
        ctx = asps_client.ratls_attest.cert_to_pem(ev1.cert_der).decode()
        reply = stub.GetSecret(secretmanager_pb2.SecretRequest(key="master_key", ctx=ctx), timeout=10)
        assert reply.value == VALUES["a1_master"]
        # an RSA certificate, like the original client's, works on the legacy service
        ev_rsa = env.evidence(ENCLAVE_2, key_type="rsa3072")
        ctx_rsa = asps_client.ratls_attest.cert_to_pem(ev_rsa.cert_der).decode()
        reply = stub.GetSecret(secretmanager_pb2.SecretRequest(key="app2_only", ctx=ctx_rsa), timeout=10)
        assert reply.value == VALUES["a2_only"]
        # the same refusals as the new service
        with pytest.raises(grpc.RpcError) as e:
            stub.GetSecret(secretmanager_pb2.SecretRequest(key="app2_only", ctx=ctx), timeout=10)
        assert_refused(e.value, grpc.StatusCode.NOT_FOUND, "not granted")
        with pytest.raises(grpc.RpcError) as e:
            stub.GetSecret(secretmanager_pb2.SecretRequest(key="master_key", ctx="garbage"), timeout=10)
        assert_refused(e.value, grpc.StatusCode.INVALID_ARGUMENT, "not an X.509")
        with pytest.raises(grpc.RpcError) as e:
            stub.GetSecret(secretmanager_pb2.SecretRequest(key="binary", ctx=ctx), timeout=10)
        assert_refused(e.value, grpc.StatusCode.FAILED_PRECONDITION, "binary", "asps.v1")
        # the client's --legacy-cczoo mode speaks it too
        value = asps_client.get_secret_legacy(f"localhost:{handle.port}", "secret1", ca=env.ca, evidence=ev1)
        assert value == VALUES["a1_other"]
        argv = ["--host", f"localhost:{handle.port}", "--ca", str(env.certs / "ca.crt"), "--provider", "sim"]
        argv += ["--sim-dir", str(env.sim.directory), "--legacy-cczoo", "--key", "master_key"]
        assert asps_client.main(argv) == 0
        assert capsys.readouterr().out == f"Secret received: {VALUES['a1_master']}\n"
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="secretmanager.SecretManger"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        handle.stop(0)


def test_pccs_url_accepts_the_originals_bare_address():
    assert asps_server.pccs_url("10.0.0.5") == "https://10.0.0.5:8081"
    assert asps_server.pccs_url("pccs.example:9999") == "https://pccs.example:9999"
    assert asps_server.pccs_url("[fd00::1]") == "https://[fd00::1]:8081"
    assert (
        asps_server.pccs_url("https://api.trustedservices.intel.com")
        == "https://api.trustedservices.intel.com"
    )
    assert asps_server.pccs_url(None) is None
    with pytest.raises(asps_server.StartupError):
        asps_server.pccs_url("host:port")


def test_pccs_unreachable_is_unavailable(env, ev1):
    policy = write_policy(env.tmp / "policy-pccs.json", policy_doc())
    config = env.config(policy, collateral=None, pccs="http://127.0.0.1:1/sgx/certification/v4/")
    handle = asps_server.serve(config)
    c = Client(f"localhost:{handle.port}", env.ca)
    try:
        err = c.refused(c.request(ev1, ["master_key"])[0])
        assert_refused(err, grpc.StatusCode.UNAVAILABLE, "collateral source unreachable", "retry later")
        err = c.refused(c.request(ev1, ["master_key"])[0])  # still serving, still the same answer
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        c.close()
        handle.stop(0)


def test_server_refuses_to_start_on_invalid_policy(env):
    doc = policy_doc()
    doc["app_list"][1]["mr_enclave"] = "abc"
    policy = write_policy(env.tmp / "policy-bad.json", doc)
    with pytest.raises(asps_server.StartupError, match=r"app app2.*mr_enclave"):
        asps_server.serve(env.config(policy))
    with pytest.raises(asps_server.StartupError, match="TLS is required"):
        asps_server.serve(env.config(env.tmp / "policy.json", cert=None))


# --- client command line against this server --------------------------------------------------------


def test_client_cli_prints_secret_and_exit_codes(server, env, capsys, tmp_path):
    base = [
        "--host",
        f"localhost:{server.port}",
        "--ca",
        str(env.certs / "ca.crt"),
        "--provider",
        "sim",
        "--sim-dir",
        str(env.sim.directory),
    ]
    assert asps_client.main([*base, "--key", "master_key"]) == 0
    assert capsys.readouterr().out == f"Secret received: {VALUES['a1_master']}\n"
    assert asps_client.main([*base, "--key", "app2_only"]) == asps_client.EXIT_NOT_GRANTED
    assert "not granted" in capsys.readouterr().err
    assert asps_client.main([*base, "--sim-mr-enclave", ENCLAVE_UNKNOWN.hex()]) == asps_client.EXIT_REFUSED
    assert "unknown enclave" in capsys.readouterr().err
    assert asps_client.main([*base, "--json", "--key", "secret1", "--key-type", "p384"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "app_id": "app1",
        "host": f"localhost:{server.port}",
        "replica": server.provisioner.replica_id,  # asps-replica trailing metadata (default hostname:port)
        "secrets": {"secret1": VALUES["a1_other"]},
    }
    out = tmp_path / "out"
    assert asps_client.main([*base, "--out-dir", str(out)]) == 0
    assert (out / "secret1").read_bytes() == VALUES["a1_other"].encode()
    assert (out / "secret1").stat().st_mode & 0o777 == 0o600
    other_ca = asps_server.generate_demo_certs(tmp_path / "other") / "ca.crt"
    rc = asps_client.main([*base[:2], "--ca", str(other_ca), *base[4:], "--connect-timeout", "2"])
    assert rc == asps_client.EXIT_UNREACHABLE  # pinned CA does not match the server's
    rc = asps_client.main(["--host", "127.0.0.1:1", *base[2:], "--connect-timeout", "2"])
    assert rc == asps_client.EXIT_UNREACHABLE
    capsys.readouterr()


# --- last: the logs ------------------------------------------------------------------------------------


def test_zz_audit_lines_and_no_secret_in_any_log_line(logs):
    audit = logs.audit()
    verdicts = {a["verdict"] for a in audit}
    assert verdicts == {"granted", "refused"}
    for a in audit:
        assert set(a) >= {"time", "peer", "mr_enclave", "mr_signer", "app_id", "names", "verdict", "reason"}
    refused = [a for a in audit if a["verdict"] == "refused"]
    assert {a["status"] for a in refused} >= {
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        "UNIMPLEMENTED",
    }
    assert all(a["reason"] for a in refused)
    assert_no_secret_in(logs.lines, list(VALUES.values()))


def test_committed_stubs_match_the_protos(repo_dir, tmp_path):
    """The generated modules are committed; they must be what grpcio-tools makes of the .proto files."""
    for proto, pyi in (("asps.proto", True), ("secretmanager.proto", False)):
        args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{repo_dir}", f"--python_out={tmp_path}"]
        args += [f"--grpc_python_out={tmp_path}", str(repo_dir / proto)]
        if pyi:
            args.append(f"--pyi_out={tmp_path}")
        subprocess.run(args, check=True)
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2_grpc.py", *(("_pb2.pyi",) if pyi else ())):
            name = stem + suffix
            assert (tmp_path / name).read_bytes() == (repo_dir / name).read_bytes(), f"regenerate {name}"
