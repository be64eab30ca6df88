"""A TD end to end through the real server and a real OpenBao: the TD's app reads its KV path with its
own read-only token; the enclave's app beside it reads another; wrong TDs are refused before Vault."""

from __future__ import annotations

import hashlib
import secrets

import grpc
import pytest
from asps_testkit import (  # noqa: F401  (fixtures: client, env, ev1, logs)
    ENCLAVE_1,
    assert_no_secret_in,
    module_client,
    module_env,
    module_ev1,
    module_logs,
    pccs_for,
    td_evidence,
    write_policy,
)
from openbao import OpenBao, openbao_server  # noqa: F401  (fixture)

import asps_server
import sgxsim

pytestmark = pytest.mark.usefixtures("logs")

RTMRS = tuple(hashlib.sha384(b"vault rtmr %d" % i).digest() for i in range(4))
VALUES = {"tdx/1/disk_key": "disk-" + secrets.token_hex(16),
          "sgx/1/image_key": "image-" + secrets.token_hex(16)}


@pytest.fixture(scope="module")
def bao(openbao_server: OpenBao) -> OpenBao:  # noqa: F811
    openbao_server.enable_kv("tdx/1", version=1)
    openbao_server.enable_kv("sgx/1", version=1)
    for path, value in VALUES.items():
        openbao_server.kv_put(path, {"key": value})
    openbao_server.read_policy("td1", "tdx/1/*")
    openbao_server.read_policy("enclave1", "sgx/1/*")
    return openbao_server


@pytest.fixture(scope="module")
def server(env, bao):
    doc = {
        "kms": "vault", "addr": bao.addr, "auth_method": "token", "timeout": 2,
        "app_list": [
            {"id": "enclave", "mr_enclave": ENCLAVE_1.hex(), "app_token": bao.create_token(["enclave1"]),
             "secrets": {"image_key": "sgx/1/image_key"}},
            {"id": "td", "mr_td": sgxsim.DEFAULT_MR_TD.hex(), "rtmr0": RTMRS[0].hex(),
             "allowed_tcb_statuses": ["UpToDate", "TDRelaunchAdvised"],
             "app_token": bao.create_token(["td1"]), "secrets": {"disk_key": "tdx/1/disk_key"}},
        ],
    }
    pccs = pccs_for(env.sim)
    policy = write_policy(env.tmp / "policy_td_vault.json", doc)
    policy.chmod(0o600)
    handle = asps_server.serve(env.config(policy, collateral=None, pccs=pccs.url))
    yield handle
    handle.stop(0)
    pccs.close()


def test_td_reads_its_secret_from_openbao(client, env):
    expected = {"disk_key": VALUES["tdx/1/disk_key"].encode()}
    assert client.get(td_evidence(env, rtmrs=RTMRS)) == ("td", expected)


def test_relaunch_advised_td_allowed_when_the_policy_says_so(client, env):
    assert client.get(td_evidence(env, rtmrs=RTMRS, relaunch=True))[0] == "td"


def test_enclave_beside_the_td_reads_its_own(client, ev1):
    assert client.get(ev1) == ("enclave", {"image_key": VALUES["sgx/1/image_key"].encode()})


@pytest.mark.parametrize(("sim", "phrase"), [
    ({"debug": True}, "debug TD refused"),
    ({"rtmrs": (bytes(48),) * 4}, "unknown TD"),
    ({"mr_td": hashlib.sha384(b"other").digest()}, "unknown TD"),
])
def test_wrong_tds_refused(client, env, sim, phrase):
    ev = td_evidence(env, **{"rtmrs": RTMRS, **sim})
    req, _ = client.request(ev, ["disk_key"])
    with pytest.raises(grpc.RpcError) as info:
        client.stub.GetSecrets(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and phrase in info.value.details()


def test_no_secret_in_any_log(client, env, logs):
    client.get(td_evidence(env, rtmrs=RTMRS))
    assert_no_secret_in(logs.lines, list(VALUES.values()))
