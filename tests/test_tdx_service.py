"""A TD end to end through the real server (real TLS, gRPC, HPKE) with the JSON KMS: one policy holds
an enclave's app and TD apps; the server verifies both kinds of quote (collateral from a PCCS stand-in
serving the SGX and the TDX APIs) and refuses each wrong TD with the right status and reason."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from asps_testkit import (  # noqa: F401  (fixtures: client, env, ev1, logs)
    ENCLAVE_1,
    assert_no_secret_in,
    module_client,
    module_env,
    module_ev1,
    module_logs,
    new_p256,
    pccs_for,
    td_evidence,
    write_policy,
)

import asps_client
import asps_server
import ratls_attest
import sgxsim

pytestmark = pytest.mark.usefixtures("logs")

MR_TD = sgxsim.DEFAULT_MR_TD
RTMRS = tuple(hashlib.sha384(b"rtmr %d" % i).digest() for i in range(4))
VALUES = {"td_key": "td-secret-" + hashlib.sha256(b"td").hexdigest()[:16], "enclave_key": "enclave-secret-42"}


def td_policy() -> dict:
    return {
        "kms": "none",
        "app_list": [
            {"id": "enclave", "mr_enclave": ENCLAVE_1.hex(),
             "secrets": {"enclave_key": VALUES["enclave_key"]}},
            {"id": "td", "mr_td": MR_TD.hex(), "rtmr1": RTMRS[1].hex(), "rtmr2": RTMRS[2].hex(),
             "secrets": {"td_key": VALUES["td_key"]}},
        ],
    }


@pytest.fixture(scope="module")
def pccs(env):
    stand_in = pccs_for(env.sim)
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def server(env, pccs):
    policy = write_policy(env.tmp / "policy_td.json", td_policy())
    handle = asps_server.serve(env.config(policy, collateral=None, pccs=pccs.url))
    yield handle
    handle.stop(0)


@pytest.fixture(scope="module")
def td(env):
    return td_evidence(env, rtmrs=RTMRS)


def refused(client, ev, code, *phrases, names=("td_key",)):
    req, _ = client.request(ev, list(names))
    with pytest.raises(grpc.RpcError) as info:
        client.stub.GetSecrets(req, timeout=10)
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    for p in phrases:
        assert p in err.details(), (p, err.details())


def test_td_receives_exactly_its_secrets(client, td, logs):
    assert client.get(td) == ("td", {"td_key": VALUES["td_key"].encode()})
    line = [a for a in logs.audit() if a.get("app_id") == "td" and a["verdict"] == "granted"][-1]
    assert line["tee"] == "tdx" and line["mr_td"] == MR_TD.hex() and line["rtmr2"] == RTMRS[2].hex()
    assert line["mr_enclave"] is None and line["tcb_status"] == "UpToDate"


def test_enclave_and_td_served_by_one_policy(client, ev1, td):
    assert client.get(ev1) == ("enclave", {"enclave_key": VALUES["enclave_key"].encode()})
    assert client.get(td, ["td_key"])[0] == "td"


def test_td_with_another_mr_td_is_unknown(client, env):
    other = hashlib.sha384(b"another TD").digest()
    refused(client, td_evidence(env, mr_td=other, rtmrs=RTMRS), grpc.StatusCode.PERMISSION_DENIED,
            f"unknown TD: no TD app in the policy has mr_td {other.hex()}")


@pytest.mark.parametrize("index", [1, 2])
def test_td_with_a_pinned_rtmr_changed_is_unknown(client, env, index):
    rtmrs = list(RTMRS)
    rtmrs[index] = hashlib.sha384(b"tampered").digest()
    refused(client, td_evidence(env, rtmrs=tuple(rtmrs)), grpc.StatusCode.PERMISSION_DENIED, "unknown TD")


def test_unpinned_rtmr_may_change(client, env):
    """rtmr3 is not pinned (it changes at run time): another value still gets the app's secrets."""
    rtmrs = (*RTMRS[:3], hashlib.sha384(b"runtime").digest())
    assert client.get(td_evidence(env, rtmrs=rtmrs))[0] == "td"


def test_debug_td_refused(client, env):
    refused(client, td_evidence(env, rtmrs=RTMRS, debug=True), grpc.StatusCode.PERMISSION_DENIED,
            "app td: debug TD refused for app td")


def test_td_relaunch_status_not_allowed(client, env):
    refused(client, td_evidence(env, rtmrs=RTMRS, relaunch=True), grpc.StatusCode.PERMISSION_DENIED,
            "TCB status TDRelaunchAdvised not allowed for app td")


def test_sgx_quote_for_the_td_app_is_refused(client, env):
    """An enclave whose measurements no SGX app names cannot reach the TD app's secrets."""
    enclave = env.evidence(hashlib.sha256(b"not in the policy").digest())
    refused(client, enclave, grpc.StatusCode.PERMISSION_DENIED, "unknown enclave")


def test_td_quote_for_the_enclave_app_is_refused(client, env):
    """A TD never matches the enclave's app, even asking only for its secret."""
    refused(client, td_evidence(env, mr_td=hashlib.sha384(b"x").digest()), grpc.StatusCode.PERMISSION_DENIED,
            "unknown TD", names=("enclave_key",))


def test_td_quote_binding_another_key_is_refused(client, env, td):
    """The TD's DICE evidence in a certificate of another key: the claims name the TD's key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    other = new_p256()
    cert = x509.load_der_x509_certificate(td.cert_der)
    dice_oid = x509.ObjectIdentifier(ratls_attest.OID_TCG_DICE_TAGGED_EVIDENCE)
    ext = cert.extensions.get_extension_for_oid(dice_oid)
    forged_der = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
                  .serial_number(1).not_valid_before(cert.not_valid_before_utc)
                  .not_valid_after(cert.not_valid_after_utc).public_key(other.public_key())
                  .add_extension(ext.value, critical=False).sign(other, hashes.SHA256())
                  .public_bytes(serialization.Encoding.DER))
    refused(client, asps_client.Evidence(forged_der, other), grpc.StatusCode.UNAUTHENTICATED,
            "evidence rejected", "binding", "another public key")


def test_replayed_token_refused_for_a_td(client, td):
    req, _ = client.request(td, ["td_key"])
    client.stub.GetSecrets(req, timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        client.stub.GetSecrets(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "already used" in info.value.details()


def test_no_secret_in_any_log(client, td, logs):
    client.get(td)
    assert_no_secret_in(logs.lines, list(VALUES.values()))
