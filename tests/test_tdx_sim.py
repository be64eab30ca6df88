"""The simulated TD: every TDX TCB level, module level, QE level and refusal, judged by dcap.py and by
dcap-qvl in the same test (differential).  Where dcap.py follows Intel's QVL or the issue over dcap-qvl,
a named test says why (test_qvl_differs_*: SGX v5 read, debug TD reported)."""

from __future__ import annotations

import dataclasses
import json

import dcap_qvl
import pytest

import dcap
import dcap_quote
import sgxsim
from dcap_collateral import Collateral

RD = bytes(range(64))


@pytest.fixture(scope="module")
def plat(sim_platform) -> sgxsim.SimPlatform:
    return sim_platform


@pytest.fixture(scope="module")
def tdx_coll(plat) -> Collateral:
    return plat.tdx_collateral()


@pytest.fixture(scope="module")
def now(tdx_coll) -> int:
    return sgxsim._iso_to_ts(json.loads(tdx_coll.tcb_info)["issueDate"]) + 60


def ours(plat, quote: bytes, coll: Collateral, now: int) -> tuple:
    try:
        r = dcap.verify(quote, coll, root_ca=plat.root_ca_der, now=now)
    except dcap.DcapError as exc:
        return ("error", getattr(exc, "check", type(exc).__name__))
    return ("ok", r.status, frozenset(r.advisory_ids))


def theirs(plat, quote: bytes, coll: Collateral, now: int) -> tuple:
    try:
        r = dcap_qvl.verify_with_root_ca(quote, dcap_qvl.QuoteCollateralV3.from_json(coll.to_json()),
                                         plat.root_ca_der, now)
    except ValueError as exc:
        return ("error", str(exc))
    return ("ok", r.status, frozenset(r.advisory_ids))


def agree(a: tuple, b: tuple) -> bool:
    """Same verdict.  dcap-qvl raises on a Revoked TCB where dcap.py reports status Revoked and leaves
    the refusal to the appraisal (as for SGX, tests/test_dcap_differential.py): that counts as agreeing."""
    if a[:2] == ("ok", "Revoked"):
        return b[0] == "error" and "TCB status is invalid: Revoked" in b[1]
    return a == b


def both(plat, quote, coll, now) -> tuple[tuple, tuple]:
    return ours(plat, quote, coll, now), theirs(plat, quote, coll, now)


def expected_advisories(*lists) -> frozenset:
    return frozenset(a for ids in lists for a in ids)


LEVELS = {lv.name: lv for lv in sgxsim.TCB_LEVELS}
MODULE = {m.isv_svn: m for m in sgxsim.TDX_MODULE_LEVELS}
SHAPES = [dict(version=4), dict(version=5), dict(version=5, td15=True)]


# --- agreement: every level, both CAs, every quote shape -------------------------------------------


@pytest.mark.parametrize("ca", sgxsim.CA_KINDS)
@pytest.mark.parametrize("tcb", sgxsim.TCB_LEVEL_NAMES)
def test_every_tdx_level_agrees_with_dcap_qvl(plat, now, tcb, ca):
    coll = plat.tdx_collateral(ca=ca)
    level = LEVELS[tcb]
    for shape in SHAPES:
        q = plat.make_td_quote(RD, tcb=tcb, ca=ca, **shape)
        a, b = both(plat, q, coll, now)
        assert a == ("ok", level.status, frozenset(level.advisory_ids)), (shape, a)
        assert agree(a, b), (shape, a, b)


@pytest.mark.parametrize("td_tcb", sgxsim.TCB_LEVEL_NAMES)
def test_tdx_components_pick_the_level_apart_from_the_sgx_ones(plat, tdx_coll, now, td_tcb):
    """An up-to-date platform (SGX components) whose TDX components sit at a lower level: the first
    level both reach decides (Intel QVL matchTcbLevels), and dcap-qvl agrees."""
    q = plat.make_td_quote(RD, tcb="UpToDate", td_tcb=td_tcb)
    a, b = both(plat, q, tdx_coll, now)
    assert a == ("ok", LEVELS[td_tcb].status, frozenset(LEVELS[td_tcb].advisory_ids))
    assert agree(a, b), (a, b)


def test_below_every_level_is_refused_by_both(plat, tdx_coll, now):
    for kw in (dict(td_tcb=sgxsim.BELOW_ALL_LEVELS), dict(tcb=sgxsim.BELOW_ALL_LEVELS)):
        a, b = both(plat, plat.make_td_quote(RD, **kw), tdx_coll, now)
        assert a == ("error", "tdx_tcb_level") and b[0] == "error" and "No matching TCB level" in b[1], kw


@pytest.mark.parametrize("module_svn", sorted(MODULE))
def test_module_levels_on_an_up_to_date_platform(plat, tdx_coll, now, module_svn):
    m = MODULE[module_svn]
    a, b = both(plat, plat.make_td_quote(RD, module_svn=module_svn), tdx_coll, now)
    assert a == ("ok", m.status, frozenset(m.advisory_ids))
    assert agree(a, b), (a, b)
    q = plat.make_td_quote(RD, module_svn=module_svn)
    r = dcap.verify(q, tdx_coll, root_ca=plat.root_ca_der, now=now)
    assert (r.tdx_module_id, r.tdx_module_status) == ("TDX_01", m.status)


def test_module_below_every_level_and_missing_identity_are_refused(plat, tdx_coll, now):
    a, b = both(plat, plat.make_td_quote(RD, module_svn=0), tdx_coll, now)
    assert a == ("error", "tdx_module_tcb_level") and b[0] == "error"
    a, b = both(plat, plat.make_td_quote(RD, module_major=2), tdx_coll, now)
    assert a == ("error", "tdx_module_identity") and b[0] == "error" and "TDX_02" in b[1]


def test_tdx_1_0_module_is_judged_by_tdx_module(plat, tdx_coll, now):
    q = plat.make_td_quote(RD, module_major=0, module_svn=2)
    a, b = both(plat, q, tdx_coll, now)
    assert a == ("ok", "UpToDate", frozenset()) and b == a
    r = dcap.verify(q, tdx_coll, root_ca=plat.root_ca_der, now=now)
    assert r.tdx_module_id == "" and r.to_dict()["tdx_module_identity"] == "tdxModule"


def test_mr_signer_seam_and_seam_attributes_must_match_the_module(plat, tdx_coll, now):
    for kw in (dict(mr_signer_seam=b"\x01" * 48), dict(seam_attributes=b"\x01" + bytes(7)),
               dict(module_major=0, mr_signer_seam=b"\x02" * 48)):
        a, b = both(plat, plat.make_td_quote(RD, **kw), tdx_coll, now)
        assert a == ("error", "tdx_module_identity") and b[0] == "error", (kw, a, b)


@pytest.mark.parametrize("qe", sgxsim.QE_TCB_LEVELS, ids=[q.status for q in sgxsim.QE_TCB_LEVELS])
def test_td_qe_levels_on_an_up_to_date_platform(plat, tdx_coll, now, qe):
    a, b = both(plat, plat.make_td_quote(RD, qe_svn=qe.isv_svn), tdx_coll, now)
    assert a == ("ok", qe.status, frozenset(qe.advisory_ids))
    assert agree(a, b), (a, b)


# --- refusals: wrong collateral kind, tampering ----------------------------------------------------


def test_tee_type_and_collateral_kind_must_match(plat, tdx_coll, now):
    sgx_coll = plat.collateral()
    a, b = both(plat, plat.make_td_quote(RD), sgx_coll, now)
    assert a == ("error", "tcb_info_mismatch") and b[0] == "error"
    a, b = both(plat, plat.make_quote(RD), tdx_coll, now)
    assert a == ("error", "tcb_info_mismatch") and b[0] == "error"


def test_td_quote_needs_the_td_qe_identity(plat, tdx_coll, now):
    issue = sgxsim._iso_to_ts(json.loads(tdx_coll.tcb_info)["issueDate"])
    qe = plat.qe_identity_dict(issue=issue)
    qe["isvprodid"] = sgxsim.TD_QE_ISV_PROD_ID   # so the id is the only thing wrong
    text, sig = plat.sign_json(qe)
    coll = dataclasses.replace(tdx_coll, qe_identity=text, qe_identity_signature=sig)
    a, b = both(plat, plat.make_td_quote(RD), coll, now)
    assert a == ("error", "td_qe_identity_mismatch") and b[0] == "error"


@pytest.mark.parametrize("field", ["mr_td", "rtmr3", "report_data", "tee_tcb_svn", "mr_service_td"])
def test_every_td_field_is_signed(plat, tdx_coll, now, field):
    q = dcap_quote.parse_quote(plat.make_td_quote(RD, version=5, td15=True))
    old = getattr(q.report, field)
    flipped = bytes([old[0] ^ 1]) + old[1:]
    bad = dataclasses.replace(q, report=dataclasses.replace(q.report, **{field: flipped}),
                              raw=b"")
    a, b = both(plat, bad.to_bytes(), tdx_coll, now)
    assert a == ("error", "isv_signature") and b[0] == "error"


def test_padding_is_reported_and_not_judged(plat, tdx_coll, now):
    q = plat.make_td_quote(RD, padding=3065)
    a, b = both(plat, q, tdx_coll, now)
    assert a == ("ok", "UpToDate", frozenset()) and b == a
    assert dcap.verify(q, tdx_coll, root_ca=plat.root_ca_der, now=now).padding == 3065
    assert ours(plat, q[:-1] + b"\x01", tdx_coll, now) == ("error", "QuoteError")


def test_qvl_differs_sgx_v5_quote_is_read(plat, now):
    """Intel's QVL reads an SGX quote v5 (body type 1, Quote.cpp); dcap-qvl 0.7.0 refuses any SGX quote
    that is not version 3.  dcap.py follows Intel's QVL (issue 13): same verdict as the v3 quote."""
    coll = plat.collateral()
    for tcb in ("UpToDate", "OutOfDate"):
        q = plat.make_quote(RD, version=5, tcb=tcb)
        assert dcap_quote.parse_quote(q).body_type == dcap_quote.BODY_SGX_ENCLAVE_REPORT
        a, b = both(plat, q, coll, now)
        assert a == ("ok", LEVELS[tcb].status, frozenset(LEVELS[tcb].advisory_ids))
        assert a == ours(plat, plat.make_quote(RD, tcb=tcb), coll, now)
        assert b[0] == "error" and "version 3" in b[1]


def test_verified_td_keeps_the_sgx_shape_empty(plat, tdx_coll, now):
    r = dcap.verify(plat.make_td_quote(RD, version=5, td15=True), tdx_coll, root_ca=plat.root_ca_der, now=now)
    assert r.tee_type == "TDX" and r.report_data == RD and r.td_report is not None and r.td_report.is_v15
    assert (r.mr_enclave, r.mr_signer, r.attributes, r.isv_prod_id, r.isv_svn) == (b"", b"", b"", 0, 0)
    d = r.to_dict()
    assert d["td"]["mr_td"] == sgxsim.DEFAULT_MR_TD.hex() and d["td"]["mr_service_td"] == "00" * 48
    assert d["tee_type"] == "TDX" and d["debug"] is False and "mr_enclave" not in d
    s = dcap.verify(plat.make_quote(RD), plat.collateral(), root_ca=plat.root_ca_der, now=now)
    assert s.tee_type == "SGX" and s.td_report is None and "td" not in s.to_dict()


def test_warm_verifier_memo_separates_td_tcbs(plat, tdx_coll, now):
    """The verdict memo is keyed by the TD's TCB, so a warm Verifier never reuses another TD's."""
    v = dcap.Verifier(tdx_coll, root_ca=plat.root_ca_der)
    for _ in range(2):
        for td_tcb in ("UpToDate", "OutOfDate", "Revoked"):
            assert v.verify(plat.make_td_quote(RD, td_tcb=td_tcb), now=now).status == LEVELS[td_tcb].status
        assert v.verify(plat.make_td_quote(RD, module_svn=4), now=now).status == "OutOfDate"


# --- where dcap.py follows Intel's QVL over dcap-qvl -----------------------------------------------


def test_qvl_differs_debug_td_is_reported_not_refused(plat, tdx_coll, now):
    """A debug TD (TUD.DEBUG) is genuine evidence of a TD the host can read: dcap.py reports
    `debug: true` and leaves the refusal to the appraisal (as for a debug SGX enclave, and as Intel's
    QVL, which does not look at TD attributes); dcap-qvl refuses it in the verifier."""
    q = plat.make_td_quote(RD, debug=True)
    r = dcap.verify(q, tdx_coll, root_ca=plat.root_ca_der, now=now)
    assert r.debug is True and r.status == "UpToDate" and r.to_dict()["debug"] is True
    b = theirs(plat, q, tdx_coll, now)
    assert b[0] == "error" and "debug" in b[1].lower()


def test_td_relaunch_advised(plat, tdx_coll, now):
    """Intel QVL checkForRelaunch (TD report 1.5): an out-of-date TD whose module is out of date, on a
    platform whose tee_tcb_svn_2 (what a relaunched TD gets) reaches the latest level, is
    TDRelaunchAdvised (TDRelaunchAdvisedConfigurationNeeded when a status says configuration).
    dcap-qvl 0.7.0 agrees."""
    latest = bytes((sgxsim.TDX_MODULE_SVN_UP_TO_DATE, sgxsim.TDX_MODULE_MAJOR,
                    sgxsim._tdx_gen(sgxsim.TCB_LEVELS[0]))) + bytes(13)
    for tcb, want in (("UpToDate", "TDRelaunchAdvised"), ("SWHardeningNeeded", "TDRelaunchAdvised"),
                      ("ConfigurationNeeded", "TDRelaunchAdvisedConfigurationNeeded"),
                      ("ConfigurationAndSWHardeningNeeded", "TDRelaunchAdvisedConfigurationNeeded")):
        q = plat.make_td_quote(RD, version=5, td15=True, tcb=tcb, td_tcb="OutOfDate", module_svn=4,
                               tee_tcb_svn_2=latest)
        a, b = both(plat, q, tdx_coll, now)
        assert a[:2] == ("ok", want) and want in dcap.TD_RELAUNCH_STATUSES, a
        assert agree(a, b), (a, b)
    # without the newer TCB in tee_tcb_svn_2, or on a TD report 1.0, no relaunch: OutOfDate
    for kw in (dict(version=5, td15=True), dict(version=4)):
        q = plat.make_td_quote(RD, td_tcb="OutOfDate", module_svn=4, **kw)
        a, b = both(plat, q, tdx_coll, now)
        assert a[:2] == ("ok", "OutOfDate") and agree(a, b), kw
    # an out-of-date QE rules relaunch out
    q = plat.make_td_quote(RD, version=5, td15=True, td_tcb="OutOfDate", module_svn=4, tee_tcb_svn_2=latest,
                           qe_svn=6)
    a, b = both(plat, q, tdx_coll, now)
    assert a[:2] == ("ok", "OutOfDate") and agree(a, b)


@pytest.mark.parametrize("tcb", ["SWHardeningNeeded", "ConfigurationNeeded",
                                 "ConfigurationAndSWHardeningNeeded"])
def test_module_out_of_date_converges_with_the_platform(plat, tdx_coll, now, tcb):
    """Intel QVL convergeTcbStatusWithTdxModuleStatus: an OutOfDate module makes SWHardeningNeeded
    OutOfDate and a Configuration* platform OutOfDateConfigurationNeeded; dcap-qvl agrees."""
    a, b = both(plat, plat.make_td_quote(RD, tcb=tcb, module_svn=4), tdx_coll, now)
    assert a[:2] == ("ok", "OutOfDate" if tcb == "SWHardeningNeeded" else "OutOfDateConfigurationNeeded")
    assert agree(a, b), (a, b)


def test_module_svn_bytes_are_not_tdx_components(plat, now):
    """With a module major version > 0, Intel's QVL compares tee_tcb_svn from byte 2 on against the
    TCB levels (bytes 0 and 1 are the module's, judged by its identity).  A TCB info whose TDX
    components demand module SVN 7 in byte 0 still matches (module level from TDX_01: UpToDate), and
    dcap-qvl 0.7.0 agrees; with major 0 (TDX 1.0) byte 0 counts, and no level matches."""
    issue = now - 60
    tcb = plat.tdx_tcb_info_dict(issue=issue)
    for level in tcb["tcbLevels"]:
        level["tcb"]["tdxtcbcomponents"][0]["svn"] = 7
    text, sig = plat.sign_json(tcb)
    coll = dataclasses.replace(plat.tdx_collateral(), tcb_info=text, tcb_info_signature=sig)
    a, b = both(plat, plat.make_td_quote(RD), coll, now)
    assert a == ("ok", "UpToDate", frozenset()) and agree(a, b), (a, b)
    a, b = both(plat, plat.make_td_quote(RD, module_major=0), coll, now)
    assert a == ("error", "tdx_tcb_level") and b[0] == "error", (a, b)


def test_td_evidence_through_ratls_is_a_td_identity_no_enclave_policy_matches(plat, tdx_coll):
    """A TD's RA-TLS certificate verifies to a TD identity (tee "tdx", mr_td), which an enclave's
    reference values refuse as a TD, before comparing any measurement."""
    import policy
    import ratls
    import ratls_attest

    class TdProvider:
        name = "sim-td"

        def get_quote(self, report_data: bytes) -> bytes:
            return plat.make_td_quote(bytes(report_data))

    der, _key = ratls_attest.make_certificate(TdProvider(), fmt="cczoo")
    ident = ratls.verify_evidence(der, dcap.Verifier(tdx_coll, root_ca=plat.root_ca_der))
    assert ident.tee == "tdx" and ident.mr_td == sgxsim.DEFAULT_MR_TD and ident.tcb_status == "UpToDate"
    assert ident.mr_enclave == b"" and ident.mr_signer == b""
    enclave_app = policy.ReferenceValues.from_dict({"mr_enclave": sgxsim.DEFAULT_MR_ENCLAVE.hex(),
                                                    "mr_signer": sgxsim.DEFAULT_MR_SIGNER.hex()})
    decision = enclave_app.appraise(ident)
    assert decision == policy.Decision(False, "a TD cannot be an SGX app")
