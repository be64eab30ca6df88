"""TD apps in the policy and appraisal as small named checks (policy decides): load-time validation
naming app and field, exact full-length comparisons, SGX and TD never matching each other's apps."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import policy
import policy_check
import ratls

MR_TD = hashlib.sha384(b"td").digest()
OTHER_TD = hashlib.sha384(b"other td").digest()
RTMRS = tuple(hashlib.sha384(bytes([i])).digest() for i in range(4))
MR_ENCLAVE = bytes.fromhex("3f2a" + "11" * 28 + "a1b2")
NOW = int(time.time())


def identity(**kw) -> ratls.Identity:
    base = dict(mr_enclave=b"", mr_signer=b"", isv_prod_id=0, isv_svn=0, debug=False, attributes=b"",
                tcb_status="UpToDate", advisory_ids=(), collateral_expiry=NOW + 3600, public_key=None,
                cert_der=b"", not_before=NOW - 60, not_after=NOW + 3600, evidence_format="dice",
                tee="tdx", mr_td=MR_TD, rtmrs=RTMRS, mr_config_id=bytes(48), mr_owner=bytes(48),
                mr_owner_config=bytes(48), xfam=bytes.fromhex("e718060000000000"),
                td_attributes=bytes.fromhex("0000001000000000"), tee_tcb_svn=bytes((5, 1, 2)) + bytes(13))
    base.update(kw)
    return ratls.Identity(**base)


def sgx_identity(**kw) -> ratls.Identity:
    return identity(tee="sgx", mr_enclave=MR_ENCLAVE, mr_signer=bytes(32), mr_td=b"", rtmrs=(), **kw)


def td_values(**kw) -> policy.TdReferenceValues:
    return policy.TdReferenceValues.from_dict({"mr_td": MR_TD.hex(), **kw}, where="app td")


def doc(*apps) -> dict:
    return {"kms": "none", "app_list": [dict(a, secrets={"k": f"v{a['id']}"}) for a in apps]}


def test_td_app_accepts_its_td_with_every_pin():
    rv = td_values(rtmr0=RTMRS[0].hex(), rtmr1=RTMRS[1].hex(), rtmr2=RTMRS[2].hex(), rtmr3=RTMRS[3].hex(),
                   mr_config_id="00" * 48, mr_owner="00" * 48, mr_owner_config="00" * 48,
                   xfam="e718060000000000", td_attributes="0000001000000000",
                   min_tee_tcb_svn="05010200" + "00" * 12)
    assert rv.appraise(identity(), now=NOW) == policy.Decision(True, None)
    assert policy.TdReferenceValues.from_dict(json.loads(json.dumps(rv.to_dict()))) == rv


@pytest.mark.parametrize(("ident_kw", "values_kw", "reason"), [
    ({"mr_td": OTHER_TD}, {}, f"mr_td {OTHER_TD.hex()} not in policy for app 7"),
    ({"rtmrs": (*RTMRS[:3], bytes(48))}, {"rtmr3": RTMRS[3].hex()},
     f"rtmr3 {'00' * 48} not in policy for app 7"),
    ({"rtmrs": (bytes(48), *RTMRS[1:])}, {"rtmr0": RTMRS[0].hex()},
     f"rtmr0 {'00' * 48} not in policy for app 7"),
    ({"xfam": bytes(8)}, {"xfam": "e718060000000000"}, f"xfam {'00' * 8} not in policy for app 7"),
    ({"debug": True}, {}, "debug TD refused for app 7"),
    ({"tcb_status": "TDRelaunchAdvised"}, {}, "TCB status TDRelaunchAdvised not allowed for app 7"),
    ({"tcb_status": "Revoked"}, {}, "TCB status Revoked is never allowed for app 7"),
    ({"tee_tcb_svn": bytes((4, 1, 2)) + bytes(13)}, {"min_tee_tcb_svn": "05010200" + "00" * 12},
     "tee_tcb_svn 04010200000000000000000000000000 below the policy's minimum "
     "05010200000000000000000000000000 for app 7"),
    ({"advisory_ids": ("INTEL-SA-00837",)}, {"refused_advisories": ["INTEL-SA-00837"]},
     "advisory INTEL-SA-00837 refused by policy for app 7"),
    ({"not_after": NOW - 1}, {}, "certificate expired"),
])
def test_td_refusals_name_the_field(ident_kw, values_kw, reason):
    decision = td_values(**values_kw).appraise(identity(**ident_kw), now=NOW, app="7")
    assert not decision.accepted and decision.reason.startswith(reason), decision


def test_relaunch_statuses_may_be_allowed_for_a_td_only():
    rv = td_values(allowed_tcb_statuses=["UpToDate", "TDRelaunchAdvised"], allow_debug=True)
    assert rv.appraise(identity(tcb_status="TDRelaunchAdvised", debug=True), now=NOW).accepted
    with pytest.raises(policy.ReferenceValuesError, match=r"unknown TCB status 'TDRelaunchAdvised'"):
        policy.ReferenceValues.from_dict({"mr_enclave": MR_ENCLAVE.hex(),
                                          "allowed_tcb_statuses": ["TDRelaunchAdvised"]})


def test_sgx_and_td_never_match_each_others_apps():
    sgx_app = policy.ReferenceValues(mr_enclave=MR_ENCLAVE)
    td_app = td_values()
    assert td_app.matches_identity(identity()) and not td_app.matches_identity(sgx_identity())
    assert sgx_app.matches_identity(sgx_identity()) and not sgx_app.matches_identity(identity())
    expected = "an SGX enclave cannot be a TD app for app t"
    assert td_app.appraise(sgx_identity(), now=NOW, app="t").reason == expected
    assert sgx_app.appraise(identity(), now=NOW, app="s").reason == "a TD cannot be an SGX app for app s"


def test_one_policy_holds_both_and_picks_by_tee_and_pins():
    pol = policy.parse_policy(doc(
        {"id": "enclave", "mr_enclave": MR_ENCLAVE.hex()},
        {"id": "td", "mr_td": MR_TD.hex()},
        {"id": "td-pinned", "mr_td": MR_TD.hex(), "rtmr2": RTMRS[2].hex()},
    ))
    assert pol.find_app(sgx_identity()).id == "enclave"
    assert pol.find_app(identity()).id == "td-pinned"  # more pins win
    assert pol.find_app(identity(rtmrs=(*RTMRS[:2], bytes(48), RTMRS[3]))).id == "td"
    assert pol.find_app(identity(mr_td=OTHER_TD)) is None
    assert [a.tee for a in pol.apps] == ["sgx", "tdx", "tdx"]


@pytest.mark.parametrize(("app", "needle"), [
    ({"mr_td": "ab" * 32}, r"app 3: mr_td: must be 96 hex characters \(48 bytes\), got 64"),
    ({"mr_td": MR_TD.hex(), "rtmr1": "00" * 47}, r"app 3: rtmr1: must be 96 hex characters"),
    ({"mr_td": MR_TD.hex(), "xfam": "00" * 48}, r"app 3: xfam: must be 16 hex characters \(8 bytes\)"),
    ({"mr_td": MR_TD.hex(), "min_tee_tcb_svn": "00"}, r"app 3: min_tee_tcb_svn: must be 32 hex characters"),
    ({"mr_td": MR_TD.hex(), "mr_enclave": MR_ENCLAVE.hex()}, r"app 3: field 'mr_enclave' is an enclave's"),
    ({"mr_td": MR_TD.hex(), "isv_prod_id": 1}, r"app 3: field 'isv_prod_id' is an enclave's"),
    ({"mr_enclave": MR_ENCLAVE.hex(), "rtmr0": "00" * 48}, r"app 3: field 'rtmr0' pins a TD"),
    ({"mr_td": ""}, r"app 3: no identity: 'mr_td' is empty"),
    ({"mr_td": MR_TD.hex(), "allow_debug": "yes"}, r"app 3: allow_debug: must be true or false"),
    ({"mr_td": MR_TD.hex(), "rtmr4": "00"}, r"app 3: unknown field\(s\) 'rtmr4'"),
    ({"mr_td": MR_TD.hex(), "allowed_tcb_statuses": ["Revoked"]}, r"Revoked can never be allowed"),
    ({}, r"app 3: no identity: give 'mr_enclave' \(and/or 'mr_signer'\), or 'mr_td' for a TD"),
])
def test_td_app_load_errors_name_app_and_field(app, needle):
    with pytest.raises(policy.PolicyError, match=needle):
        policy.parse_policy(doc({"id": 3, **app}))


def test_two_td_apps_with_the_same_pins_are_refused():
    with pytest.raises(policy.PolicyError, match=r"app b: same identity \(mr_td and the same pinned TD"):
        policy.parse_policy(doc({"id": "a", "mr_td": MR_TD.hex()}, {"id": "b", "mr_td": MR_TD.hex().upper()}))


def test_all_of_refuses_to_be_built_empty_and_reports_the_first_failure():
    with pytest.raises(policy.ReferenceValuesError, match="no checks"):
        policy.AllOf(())
    checks = policy.AllOf((policy.TeeIs("tdx"), policy.Measurement("mr_td", OTHER_TD), policy.NotDebug("TD")))
    result = checks.verify(identity(debug=True))
    assert result == policy.Failure(f"mr_td {MR_TD.hex()} not in policy") and not result.success
    assert policy.AllOf((policy.TeeIs("tdx"),)).verify(identity()) == policy.SUCCESS


def test_each_check_is_small_and_says_why():
    assert policy.Measurement("rtmr2", RTMRS[2]).verify(identity()).success
    assert policy.Measurement("rtmr2", RTMRS[1]).verify(identity(rtmrs=())).reason == "rtmr2  not in policy"
    assert policy.MinTeeTcbSvn(bytes(16)).verify(identity()).success
    assert policy.CertificateValid(NOW).verify(identity(not_before=NOW + 10)).reason.startswith(
        "certificate not yet valid")
    assert policy.Advisories(None, frozenset({"A"})).verify(identity(advisory_ids=("b",))).reason == (
        "advisory B not in the policy's accepted advisories")


def test_identity_dict_of_a_td_has_its_fields():
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    out = identity(public_key=key).to_dict()
    assert out["tee"] == "tdx" and out["mr_td"] == MR_TD.hex() and out["rtmr2"] == RTMRS[2].hex()
    assert "mr_enclave" not in out


def test_check_policy_counts_td_apps(tmp_path, capsys):
    path = tmp_path / "p.json"
    apps = ({"id": 1, "mr_enclave": MR_ENCLAVE.hex()}, {"id": 2, "mr_td": MR_TD.hex()})
    path.write_text(json.dumps(doc(*apps)))
    path.chmod(0o600)
    assert policy_check.main([str(path)]) == 0
    assert "loads: 2 app(s) (1 enclave, 1 TD)" in capsys.readouterr().out
    bad = json.loads(path.read_text())
    bad["app_list"][1]["rtmr0"] = "00"
    path.write_text(json.dumps(bad))
    assert policy_check.main([str(path)]) == 1
    assert "rtmr0: must be 96 hex characters" in capsys.readouterr().out
