"""Verification of the real Intel quotes in ../shared/samples, against dcap-qvl, and on the command line.

Also the named cases where Intel's QVL (followed here) and dcap-qvl disagree: `test_qvl_*`.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import dcap
import dcap_quote
import pccs
from dcap_collateral import Collateral

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "samples"
FUTURE = 4102444800  # 2100-01-01


def sgx_cases() -> list[Path]:
    cases = [p for p in sorted((SAMPLES / "real-dcap").iterdir()) if (p / "quote.bin").is_file()]
    cases.append(SAMPLES / "intel-sgx-v3")
    cases += [p for p in sorted((SAMPLES / "ratls-real").iterdir()) if (p / "quote.bin").is_file()]
    return cases


CASES = sgx_cases()
IDS = [p.name for p in CASES]


@dataclasses.dataclass
class Case:
    name: str
    quote: bytes
    collateral_json: str
    collateral: Collateral
    expected: dict
    path: Path


def load(path: Path) -> Case:
    text = (path / "collateral.json").read_text()
    return Case(
        path.name,
        (path / "quote.bin").read_bytes(),
        text,
        Collateral.from_json(text),
        json.loads((path / "expected.json").read_text()),
        path,
    )


@pytest.fixture(scope="module")
def intel_root() -> bytes:
    root = (REPO / "intel_sgx_root_ca.der").read_bytes()
    assert root == (SAMPLES / "real-dcap" / "IntelSGXRootCA.der").read_bytes()
    return root


def qvl(
    case: Case,
    quote: bytes | None = None,
    collateral: dict | None = None,
    *,
    root: bytes,
    now: int | None = None,
):
    """dcap-qvl's verdict: ("ok", status, advisories) or ("error", message)."""
    coll = dcap_qvl.QuoteCollateralV3.from_json(
        json.dumps(collateral) if collateral else case.collateral_json
    )
    try:
        r = dcap_qvl.verify_with_root_ca(
            case.quote if quote is None else quote, coll, root, case.expected["now"] if now is None else now
        )
    except ValueError as exc:
        return ("error", str(exc))
    return ("ok", r.status, frozenset(r.advisory_ids))


def ours(
    case: Case,
    quote: bytes | None = None,
    collateral: dict | None = None,
    *,
    root: bytes,
    now: int | None = None,
):
    coll = Collateral.from_dict(collateral) if collateral else case.collateral
    try:
        r = dcap.verify(
            case.quote if quote is None else quote,
            coll,
            root_ca=root,
            now=case.expected["now"] if now is None else now,
        )
    except dcap.DcapError as exc:
        return ("error", str(exc))
    return ("ok", r.status, frozenset(r.advisory_ids), r.debug)


def agree(mine, theirs) -> bool:
    """Same verdict; a debug enclave (dcap-qvl: "Debug mode is enabled") or Revoked status (dcap-qvl
    raises) that dcap.py reports as a result counts as agreement."""
    if mine[0] == "ok" and theirs[0] == "ok":
        return mine[1:3] == theirs[1:3]
    if mine[0] == "error" and theirs[0] == "error":
        return True
    if mine[0] == "ok" and theirs[0] == "error":
        return (mine[3] and "Debug mode is enabled" in theirs[1]) or (
            mine[1] == "Revoked" and "Revoked" in theirs[1]
        )
    return False


# --- an independent oracle for the TCB status (used for the debug cases dcap-qvl refuses) ----------


def oracle_status(case: Case) -> tuple[str, set[str]]:
    """Platform level from the TCB info JSON with the PCK SVNs read by dcap-qvl's own parser, QE level
    from the QE identity; merged as Intel QVL does.  Written independently of dcap.py."""
    q = dcap_qvl.parse_quote(case.quote)
    ext = q.pck_extension()
    tcb = json.loads(case.collateral.tcb_info)
    cpusvn, pcesvn = list(ext.cpu_svn), ext.pce_svn
    levels = sorted(
        tcb["tcbLevels"],
        key=lambda lv: ([c["svn"] for c in lv["tcb"]["sgxtcbcomponents"]], lv["tcb"]["pcesvn"]),
        reverse=True,
    )
    platform = next(
        lv
        for lv in levels
        if all(a >= c["svn"] for a, c in zip(cpusvn, lv["tcb"]["sgxtcbcomponents"], strict=True))
        and pcesvn >= lv["tcb"]["pcesvn"]
    )
    qe_svn = int.from_bytes(case.quote[48 + 384 + 4 + 128 + 258 : 48 + 384 + 4 + 128 + 260], "little")
    qe = next(
        lv for lv in json.loads(case.collateral.qe_identity)["tcbLevels"] if lv["tcb"]["isvsvn"] <= qe_svn
    )
    status = platform["tcbStatus"]
    if qe["tcbStatus"] == "Revoked":
        status = "Revoked"
    elif qe["tcbStatus"] != "UpToDate":
        status = {
            "UpToDate": "OutOfDate",
            "SWHardeningNeeded": "OutOfDate",
            "ConfigurationNeeded": "OutOfDateConfigurationNeeded",
            "ConfigurationAndSWHardeningNeeded": "OutOfDateConfigurationNeeded",
        }.get(status, status)
    return status, set(platform.get("advisoryIDs", [])) | set(qe.get("advisoryIDs", []))


# --- every real SGX case ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_real_case_verifies_with_expected_verdict(path, intel_root):
    case = load(path)
    exp = case.expected
    r = dcap.verify(case.quote, case.collateral, root_ca=intel_root, now=exp["now"])
    assert r.mr_enclave.hex() == exp["mr_enclave"]
    assert r.mr_signer.hex() == exp["mr_signer"]
    assert r.report_data.hex() == exp["report_data"]
    assert r.attributes.hex() == exp["attributes"]
    assert r.debug is exp["debug"]
    assert r.fmspc.hex() == exp["fmspc"].lower()
    if "isv_prod_id" in exp:
        assert (r.isv_prod_id, r.isv_svn) == (exp["isv_prod_id"], exp["isv_svn"])
    assert r.status in dcap.TCB_STATUSES
    if exp["status"] is not None:
        assert r.status == exp["status"]
        assert set(r.advisory_ids) == set(exp["advisory_ids"])
        if "qe_status" in exp:
            assert r.qe_status == exp["qe_status"]["status"]
            assert r.platform_status == exp["platform_status"]["status"]
    else:
        # The debug cases: dcap-qvl refuses with "Debug mode is enabled" before any status; dcap.py
        # reports debug=True with the status (refusing debug is the appraisal's job).
        assert "Debug mode is enabled" in exp["error"]
        assert r.debug
    assert (r.status, set(r.advisory_ids)) == oracle_status(case)
    # collateral_expiry is the end of the validity window
    assert r.collateral_expiry >= exp["now"]
    d = r.to_dict()
    assert d["mr_enclave"] == exp["mr_enclave"] and d["advisory_ids"] == list(r.advisory_ids)
    json.dumps(d)


def test_debug_cases_are_results_with_their_status(intel_root):
    debug = [load(p) for p in CASES if load(p).expected["debug"]]
    assert len(debug) == 2
    for case in debug:
        r = dcap.verify(case.quote, case.collateral, root_ca=intel_root, now=case.expected["now"])
        assert r.debug and r.status == oracle_status(case)[0]


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_real_case_fails_in_2100_and_at_the_boundaries(path, intel_root):
    case = load(path)
    exp = case.expected
    with pytest.raises(dcap.VerificationError) as info:
        dcap.verify(case.quote, case.collateral, root_ca=intel_root, now=exp.get("future_now", FUTURE))
    assert info.value.check.endswith("_expired")
    checked = 0
    for b in exp.get("boundary_checks", []):
        if b.get("reference_specific"):
            continue  # see test_qvl_rejects_crl_before_this_update
        with pytest.raises(dcap.VerificationError) as info:
            dcap.verify(case.quote, case.collateral, root_ca=intel_root, now=b["now"])
        assert info.value.check.endswith(("_expired", "_not_yet_valid")), info.value
        checked += 1
    if "boundary_checks" in exp:
        assert checked >= 1


def test_intel_sample_expires(intel_root):
    case = load(SAMPLES / "intel-sgx-v3")
    r = dcap.verify(case.quote, case.collateral, now=case.expected["now"])  # default root: the shipped one
    assert r.status == "ConfigurationAndSWHardeningNeeded"
    assert set(r.advisory_ids) == {"INTEL-SA-00289", "INTEL-SA-00615"}
    assert r.collateral_expiry < case.expected["now_after_expiry"]
    with pytest.raises(dcap.VerificationError, match="expired"):
        dcap.verify(case.quote, case.collateral, now=case.expected["now_after_expiry"])
    # the boundary itself: valid at collateral_expiry, not one second later
    dcap.verify(case.quote, case.collateral, now=r.collateral_expiry)
    with pytest.raises(dcap.VerificationError):
        dcap.verify(case.quote, case.collateral, now=r.collateral_expiry + 1)


def test_pck_extension_matches_dcap_qvl_parser():
    for path in CASES:
        case = load(path)
        q = dcap_quote.parse_quote(case.quote)
        leaf_pem = q.signature.certification_data.data.split(b"-----END CERTIFICATE-----")[0]
        leaf_der = x509.load_pem_x509_certificate(leaf_pem + b"-----END CERTIFICATE-----\n")
        ours_ext = dcap.parse_sgx_extension(
            leaf_der.extensions.get_extension_for_oid(
                x509.ObjectIdentifier(dcap.SGX_EXTENSION_OID)
            ).value.value
        )
        theirs = dcap_qvl.parse_quote(case.quote).pck_extension()
        assert ours_ext.cpu_svn == bytes(theirs.cpu_svn)
        assert bytes(ours_ext.comp_svns) == bytes(theirs.cpu_svn)  # Intel writes both the same
        assert ours_ext.pce_svn == theirs.pce_svn
        assert (
            ours_ext.fmspc == bytes(theirs.fmspc) and ours_ext.fmspc.hex() == case.expected["fmspc"].lower()
        )
        assert ours_ext.pce_id == bytes(theirs.pce_id)
        assert ours_ext.ppid == bytes(theirs.ppid)


# --- differential against dcap-qvl -----------------------------------------------------------------


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_differential_on_real_inputs(path, intel_root):
    case = load(path)
    exp = case.expected
    times = [exp["now"], exp.get("future_now", FUTURE)]
    times += [b["now"] for b in exp.get("boundary_checks", []) if not b.get("reference_specific")]
    if "now_after_expiry" in exp:
        times.append(exp["now_after_expiry"])
    for now in times:
        mine, theirs = ours(case, root=intel_root, now=now), qvl(case, root=intel_root, now=now)
        assert agree(mine, theirs), (now, mine, theirs)


def flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x01
    return bytes(b)


def quote_mutations(q: bytes) -> dict[str, bytes]:
    parsed = dcap_quote.parse_quote(q)
    sig0 = 436
    qe0 = sig0 + 128
    auth_len = len(parsed.signature.qe_auth_data)
    cert0 = qe0 + 384 + 64 + 2 + auth_len + 6
    pem = parsed.signature.certification_data.data
    second = pem.index(b"-----BEGIN CERTIFICATE-----", 10)
    return {
        "isv_signature": flip(q, sig0 + 5),
        "isv_signature_s": flip(q, sig0 + 40),
        "attestation_key": flip(q, sig0 + 64 + 10),
        "report_mr_enclave": flip(q, 48 + 64),
        "report_data": flip(q, 48 + 320),
        "header_user_data": flip(q, 30),
        "qe_report_isv_svn": flip(q, qe0 + 258),
        "qe_report_data": flip(q, qe0 + 320),
        "qe_report_signature": flip(q, qe0 + 384 + 3),
        "qe_auth_data": flip(q, qe0 + 384 + 64 + 2),
        "pck_leaf_signature_byte": flip(q, cert0 + second - 80),
        "qe_vendor_id": flip(q, 12),
        "version_4": q[:0] + b"\x04" + q[1:],
        "key_type_3": q[:2] + b"\x03" + q[3:],
        "truncated_sig": q[: sig0 + 100],
        "truncated_chain": q[:-300],
        "no_signature_data": q[:436],
    }


def collateral_mutations(d: dict) -> dict[str, dict]:
    out = {}
    for key in ("tcb_info_signature", "qe_identity_signature"):
        s = bytearray.fromhex(d[key])
        s[7] ^= 1
        out[key] = {**d, key: s.hex()}
    for key in ("pck_crl", "root_ca_crl"):
        b = bytearray.fromhex(d[key])
        b[-5] ^= 1  # inside the signature
        out[key + "_signature"] = {**d, key: b.hex()}
    out["tcb_info_edited"] = {
        **d,
        "tcb_info": d["tcb_info"].replace('"tcbEvaluationDataNumber":', '"tcbEvaluationDataNumber": ', 1),
    }
    out["qe_identity_edited"] = {
        **d,
        "qe_identity": d["qe_identity"].replace('"isvprodid":1', '"isvprodid":2', 1),
    }
    out["tcb_chain_swapped"] = {**d, "tcb_info_issuer_chain": d["pck_crl_issuer_chain"]}
    out["qe_chain_swapped"] = {**d, "qe_identity_issuer_chain": d["pck_crl_issuer_chain"]}
    out["tcb_info_from_qe_identity"] = {
        **d,
        "tcb_info": d["qe_identity"],
        "tcb_info_signature": d["qe_identity_signature"],
    }
    return out


@pytest.mark.parametrize(
    "path",
    [
        SAMPLES / "intel-sgx-v3",
        SAMPLES / "real-dcap" / "zkdcap-00906ed5-2025",
        SAMPLES / "real-dcap" / "signal-svr2-00606a-2026",
    ],
    ids=lambda p: p.name,
)
def test_differential_on_mutated_real_inputs(path, intel_root):
    """Every mutation: both verifiers reject (or agree on the verdict)."""
    case = load(path)
    for name, q in quote_mutations(case.quote).items():
        mine, theirs = ours(case, q, root=intel_root), qvl(case, q, root=intel_root)
        assert mine[0] == "error", (name, mine)
        assert agree(mine, theirs), (name, mine, theirs)
    d = json.loads(case.collateral_json)
    for name, coll in collateral_mutations(d).items():
        mine, theirs = (
            ours(case, collateral=coll, root=intel_root),
            qvl(case, collateral=coll, root=intel_root),
        )
        assert mine[0] == "error", (name, mine)
        assert agree(mine, theirs), (name, mine, theirs)


def test_mutations_name_their_check(intel_root):
    case = load(SAMPLES / "intel-sgx-v3")
    muts = quote_mutations(case.quote)
    expected_checks = {
        "isv_signature": "isv_signature",
        "report_mr_enclave": "isv_signature",
        "header_user_data": "isv_signature",
        "qe_report_isv_svn": "qe_report_signature",
        "qe_report_signature": "qe_report_signature",
        "qe_auth_data": "qe_report_data",
        "attestation_key": "qe_report_data",
        "qe_vendor_id": "qe_vendor_id",
        "pck_leaf_signature_byte": "pck_chain",
    }
    for name, check in expected_checks.items():
        with pytest.raises(dcap.VerificationError) as info:
            dcap.verify(muts[name], case.collateral, now=case.expected["now"])
        assert info.value.check == check, (name, info.value)
    for name in ("version_4", "key_type_3", "truncated_sig", "truncated_chain", "no_signature_data"):
        with pytest.raises(dcap_quote.QuoteError):
            dcap.verify(muts[name], case.collateral, now=case.expected["now"])
    d = json.loads(case.collateral_json)
    checks = {
        "tcb_info_signature": "tcb_info_signature",
        "qe_identity_signature": "qe_identity_signature",
        "pck_crl_signature": "pck_crl",
        "root_ca_crl_signature": "root_ca_crl",
        "tcb_info_edited": "tcb_info_signature",
        "qe_identity_edited": "qe_identity_signature",
        "tcb_chain_swapped": "tcb_info_chain",
        "qe_chain_swapped": "qe_identity_chain",
    }
    muts_c = collateral_mutations(d)
    for name, check in checks.items():
        with pytest.raises(dcap.VerificationError) as info:
            dcap.verify(case.quote, Collateral.from_dict(muts_c[name]), now=case.expected["now"])
        assert info.value.check == check, (name, info.value)


def self_signed_root(cn: str = "Test SGX Root CA") -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2000, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2090, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER), cert.public_bytes(serialization.Encoding.PEM)


def test_other_trusted_root_rejects_real_quotes(intel_root):
    case = load(SAMPLES / "intel-sgx-v3")
    der, pem = self_signed_root()
    for root in (der, pem):
        mine = ours(case, root=root)
        assert mine[0] == "error" and "pck_chain" in mine[1]
        assert qvl(case, root=der)[0] == "error"
    with pytest.raises(dcap.VerificationError) as info:
        dcap.verify(case.quote, case.collateral, root_ca=b"not a certificate", now=case.expected["now"])
    assert info.value.check == "root_ca"
    assert dcap.is_intel_root(intel_root) and not dcap.is_intel_root(der)


# --- Verifier: caches ------------------------------------------------------------------------------


def test_warm_verification_reverifies_nothing(monkeypatch, intel_root):
    case = load(SAMPLES / "intel-sgx-v3")
    v = dcap.Verifier(case.collateral, root_ca=intel_root)
    first = v.verify(case.quote, now=case.expected["now"])
    calls: list[str] = []
    for name in (
        "_check_pck_chain",
        "_check_crl",
        "_check_signed_json",
        "_verify_ecdsa",
        "_load_cert",
        "_verify_chain",
        "parse_tcb_info",
        "parse_qe_identity",
        "_load_trusted_root",
    ):
        real = getattr(dcap, name)
        monkeypatch.setattr(dcap, name, lambda *a, _n=name, _f=real, **k: (calls.append(_n), _f(*a, **k))[1])
    again = v.verify(bytes(case.quote), now=case.expected["now"] + 10)
    assert calls == []
    assert dataclasses.replace(again, quote=first.quote) == first
    # ...but every validity window is still checked against `now`
    with pytest.raises(dcap.VerificationError, match="expired"):
        v.verify(case.quote, now=case.expected["now_after_expiry"])
    # ...and the per-quote signature is still verified
    with pytest.raises(dcap.VerificationError) as info:
        v.verify(flip(case.quote, 436 + 3), now=case.expected["now"])
    assert info.value.check == "isv_signature"
    assert calls == []


def test_verifier_with_file_source_and_parsed_quote(tmp_path, intel_root):
    case = load(SAMPLES / "real-dcap" / "zkdcap-00906ed5-2025")
    path = tmp_path / "c.json"
    path.write_text(case.collateral_json)
    v = dcap.Verifier(pccs.FileCollateralSource(path), root_ca=intel_root)
    r = v.verify(dcap_quote.parse_quote(case.quote), now=case.expected["now"])
    assert r.status == case.expected["status"] and r.pck_ca == "processor"
    with pytest.raises(TypeError):
        dcap.Verifier(object())  # type: ignore[arg-type]


# --- Intel QVL vs dcap-qvl: named differences ------------------------------------------------------


def test_qvl_rejects_crl_before_this_update(intel_root):
    """Intel QVL (CrlStore::expired -> Validity::isValid) rejects a CRL before its thisUpdate; dcap-qvl
    ignores thisUpdate.  The samples' `reference_specific` boundary checks are exactly these."""
    seen = 0
    for path in CASES:
        case = load(path)
        for b in case.expected.get("boundary_checks", []):
            if not b.get("reference_specific"):
                continue
            seen += 1
            with pytest.raises(dcap.VerificationError) as info:
                dcap.verify(case.quote, case.collateral, root_ca=intel_root, now=b["now"])
            assert info.value.check.endswith("crl_not_yet_valid"), info.value
            theirs = qvl(case, root=intel_root, now=b["now"])
            assert theirs[0] == "ok" or "Debug mode" in theirs[1]
    assert seen >= 3


def test_dcap_py_rejects_nonzero_trailing_bytes_after_signature_data(intel_root):
    """Intel QVL (Quote::parse) and dcap-qvl both ignore bytes after the declared signature data;
    dcap.py accepts only zeros there (the fixed-size buffers of configfs-tsm and some QGS), reports
    them as padding, and refuses anything else, so no unsigned bytes ride along."""
    case = load(SAMPLES / "intel-sgx-v3")
    assert qvl(case, case.quote + b"x", root=intel_root)[0] == "ok"
    with pytest.raises(dcap_quote.QuoteError, match=r"signature_data.*not zero padding"):
        dcap.verify(case.quote + b"x", case.collateral, root_ca=intel_root, now=case.expected["now"])
    padded = dcap.verify(case.quote + bytes(7), case.collateral, root_ca=intel_root, now=case.expected["now"])
    assert padded.quote.padding == 7 and padded.status == case.expected["status"]


# Cases that need collateral signed differently from Intel's: the simulated platform signs them.


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    sgxsim = pytest.importorskip("sgxsim")
    return sgxsim.SimPlatform.init(tmp_path_factory.mktemp("sim-dcap"))


def sim_verdicts(sim, quote: bytes, coll: Collateral, now: int | None = None):
    import time

    now = int(time.time()) if now is None else now
    try:
        mine = dcap.verify(quote, coll, root_ca=sim.root_ca_der, now=now)
    except dcap.DcapError as exc:
        mine = exc
    try:
        theirs = dcap_qvl.verify_with_root_ca(
            quote, dcap_qvl.QuoteCollateralV3.from_json(coll.to_json()), sim.root_ca_der, now
        )
    except ValueError as exc:
        theirs = exc
    return mine, theirs


def test_qvl_checks_pce_id(sim):
    """Intel QVL (QuoteVerifier 4.1.2.4.10) requires TCB info pceId == the PCK certificate's PCE-ID;
    dcap-qvl compares only the FMSPC."""
    import time

    issue = int(time.time()) - 3600
    tcb = sim.tcb_info_dict(issue=issue)
    tcb["pceId"] = "0100"
    coll = sim.build_collateral(issue=issue, tcb_info=tcb)
    mine, theirs = sim_verdicts(sim, sim.make_quote(bytes(64)), coll)
    assert isinstance(mine, dcap.VerificationError) and mine.check == "tcb_info_mismatch"
    assert not isinstance(theirs, Exception), theirs


def test_qvl_matches_tcb_levels_on_component_svns(sim):
    """Intel QVL compares the TCB info's sgxtcbcomponents with the PCK certificate's 16 component SVN
    fields (OIDs ...13.1.2.1-16); dcap-qvl compares them with the CPUSVN octet string (...13.1.2.18).
    A certificate whose CPUSVN claims more than its component SVNs shows the difference."""
    sgxsim = pytest.importorskip("sgxsim")
    level = next(lv for lv in sgxsim.TCB_LEVELS if lv.name == "OutOfDate")
    top = next(lv for lv in sgxsim.TCB_LEVELS if lv.name == "UpToDate")
    chain = sim.issue_pck_certificate(
        "OutOfDate", sgx_svns=level.sgx_svns, cpu_svn=bytes(top.sgx_svns), pce_svn=top.pce_svn
    )
    quote = sim.make_quote(bytes(64), tcb="OutOfDate", pck_chain=chain)
    mine, theirs = sim_verdicts(sim, quote, sim.collateral())
    assert not isinstance(mine, Exception), mine
    assert mine.status == "OutOfDate"
    assert not isinstance(theirs, Exception) and theirs.status == "UpToDate"


def test_qe_out_of_date_converges_as_intel_qvl(sim):
    """Intel QVL convergeTcbStatusWithQeTcbStatus: QE OutOfDate + platform ConfigurationNeeded ->
    OutOfDateConfigurationNeeded.  dcap-qvl 0.7.0 agrees on every combination (checked here)."""
    sgxsim = pytest.importorskip("sgxsim")
    old_qe = min(lv.isv_svn for lv in sgxsim.QE_TCB_LEVELS if lv.status == "OutOfDate")
    for platform, merged in (
        ("ConfigurationNeeded", "OutOfDateConfigurationNeeded"),
        ("ConfigurationAndSWHardeningNeeded", "OutOfDateConfigurationNeeded"),
        ("SWHardeningNeeded", "OutOfDate"),
        ("UpToDate", "OutOfDate"),
    ):
        quote = sim.make_quote(bytes(64), tcb=platform, qe_svn=old_qe)
        mine, theirs = sim_verdicts(sim, quote, sim.collateral())
        assert not isinstance(mine, Exception), mine
        assert (mine.platform_status, mine.qe_status, mine.status) == (platform, "OutOfDate", merged)
        assert dcap.merge_tcb_status(platform, "OutOfDate") == merged
        assert not isinstance(theirs, Exception) and theirs.status == merged


def test_qvl_accepts_sgx_v4_quotes(sim):
    """Intel QVL verifies SGX quotes of version 4 (QE report in certification data type 6); dcap-qvl
    refuses them ("SGX TEE quote must have version 3")."""
    quote = sim.make_quote(bytes(64), version=4)
    mine, theirs = sim_verdicts(sim, quote, sim.collateral())
    assert not isinstance(mine, Exception), mine
    assert mine.status == "UpToDate" and mine.quote.header.version == 4
    assert isinstance(theirs, Exception)


def test_qvl_accepts_any_qe_auth_data_length(sim):
    """Intel QVL hashes whatever QE authentication data the quote carries; dcap-qvl insists on 32 bytes."""
    quote = sim.make_quote(bytes(64), qe_auth_data=b"\x01" * 48)
    mine, theirs = sim_verdicts(sim, quote, sim.collateral())
    assert not isinstance(mine, Exception), mine
    assert isinstance(theirs, Exception)


def test_pck_crl_must_be_of_the_pck_issuer(sim):
    """Intel QVL: the PCK CRL's issuer must be the PCK certificate's issuer (4.1.2.4.6).  A Platform-CA
    quote with a Processor-CA CRL is refused (dcap-qvl agrees: UnknownRevocationStatus)."""
    quote = sim.make_quote(bytes(64), ca="platform")
    mine, theirs = sim_verdicts(sim, quote, sim.collateral(ca="processor"))
    assert isinstance(mine, dcap.VerificationError) and mine.check == "pck_crl"
    assert isinstance(theirs, Exception)
    ok, _ = sim_verdicts(sim, quote, sim.collateral(ca="platform"))
    assert not isinstance(ok, Exception) and ok.pck_ca == "platform"


def test_dcap_py_requires_zero_upper_qe_report_data(sim):
    """Both Intel QVL and dcap-qvl compare only QE report_data[0:32]; dcap.py (per the issue: "followed
    by zeros") also requires bytes 32..63 to be zero."""
    import hashlib

    sgxsim = pytest.importorskip("sgxsim")
    att = dcap_quote.parse_quote(sim.make_quote(bytes(64))).signature.attestation_key
    rd = hashlib.sha256(att + sgxsim.QE_AUTH_DATA).digest() + b"\x01" * 32
    quote = sim.make_quote(bytes(64), qe_report_overrides={"report_data": rd})
    mine, theirs = sim_verdicts(sim, quote, sim.collateral())
    assert isinstance(mine, dcap.VerificationError) and mine.check == "qe_report_data"
    assert not isinstance(theirs, Exception), theirs


# --- command line ----------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "dcap.py"), *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_cli_verify_json(intel_root):
    path = SAMPLES / "intel-sgx-v3"
    exp = json.loads((path / "expected.json").read_text())
    p = run_cli(
        "verify",
        str(path / "quote.bin"),
        "--collateral",
        str(path / "collateral.json"),
        "--now",
        str(exp["now"]),
        "--json",
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    out = json.loads(p.stdout)
    assert out["status"] == exp["status"] and set(out["advisory_ids"]) == set(exp["advisory_ids"])
    for key in ("mr_enclave", "mr_signer", "report_data"):
        assert out[key] == exp[key] and out[key] == out[key].lower()
    assert out["debug"] is False and isinstance(out["isv_prod_id"], int) and isinstance(out["isv_svn"], int)


def test_cli_verify_text_and_hex_quote_file(tmp_path):
    path = SAMPLES / "real-dcap" / "integritee-00906ea1-debug"
    exp = json.loads((path / "expected.json").read_text())
    hexfile = tmp_path / "quote.hex"
    hexfile.write_text((path / "quote.bin").read_bytes().hex() + "\n")
    p = run_cli(
        "verify",
        str(hexfile),
        "--collateral",
        str(path / "collateral.json"),
        "--now",
        str(exp["now"]),
        "--root-ca",
        str(SAMPLES / "real-dcap" / "IntelSGXRootCA.der"),
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # the given root is Intel's: no warning
    assert "debug: True" in p.stdout and f"mr_enclave: {exp['mr_enclave']}" in p.stdout


def test_cli_verify_failure_is_one_line_on_stderr():
    path = SAMPLES / "intel-sgx-v3"
    p = run_cli(
        "verify",
        str(path / "quote.bin"),
        "--collateral",
        str(path / "collateral.json"),
        "--now",
        str(FUTURE),
        "--json",
    )
    assert p.returncode != 0 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "expired" in p.stderr
    p = run_cli(
        "verify",
        str(SAMPLES / "real-dcap" / "tdx" / "oasis-50806f-2023" / "quote.bin"),
        "--collateral",
        str(path / "collateral.json"),
    )
    assert p.returncode != 0 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    p = run_cli("verify", "/nonexistent/quote", "--collateral", str(path / "collateral.json"))
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1


def test_cli_warns_when_root_is_not_intel(tmp_path):
    path = SAMPLES / "intel-sgx-v3"
    _, pem = self_signed_root()
    (tmp_path / "root.pem").write_bytes(pem)
    p = run_cli(
        "verify",
        str(path / "quote.bin"),
        "--collateral",
        str(path / "collateral.json"),
        "--root-ca",
        str(tmp_path / "root.pem"),
        "--now",
        str(json.loads((path / "expected.json").read_text())["now"]),
    )
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("warning:") and "not the Intel SGX Root CA" in lines[0]
    assert len(lines) == 2 and "pck_chain" in lines[1]


def test_cli_sim_round_trip(tmp_path):
    pytest.importorskip("sgxsim")
    sim_dir = tmp_path / "sim"
    p = run_cli("sim-init", str(sim_dir))
    assert p.returncode == 0, p.stderr
    assert (sim_dir / "root_ca.pem").is_file() and (sim_dir / "collateral.json").is_file()
    out = tmp_path / "q.bin"
    p = run_cli(
        "quote",
        "--provider",
        "sim",
        "--sim-dir",
        str(sim_dir),
        "--report-data",
        "ab" * 64,
        "--mr-enclave",
        "11" * 32,
        "--isv-svn",
        "3",
        "--tcb",
        "OutOfDate",
        "-o",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    p = run_cli(
        "verify",
        str(out),
        "--collateral",
        str(sim_dir / "collateral.json"),
        "--root-ca",
        str(sim_dir / "root_ca.pem"),
        "--json",
    )
    assert p.returncode == 0, p.stderr
    assert "warning" in p.stderr and "not the Intel SGX Root CA" in p.stderr
    res = json.loads(p.stdout)
    assert res["report_data"] == "ab" * 64 and res["mr_enclave"] == "11" * 32 and res["isv_svn"] == 3
    assert res["status"] == "OutOfDate"
    # without --root-ca the sim quote is refused (the default trust anchor is Intel's)
    p = run_cli("verify", str(out), "--collateral", str(sim_dir / "collateral.json"))
    assert p.returncode != 0 and "pck_chain" in p.stderr


# --- simulated platform: differential over every TCB level and systematic mutations ------------------


def verdicts_agree(mine, theirs) -> bool:
    if isinstance(mine, Exception):
        return isinstance(mine, dcap.DcapError) and isinstance(theirs, Exception)
    if isinstance(theirs, Exception):
        return (mine.debug and "Debug mode is enabled" in str(theirs)) or (
            mine.status == "Revoked" and "Revoked" in str(theirs)
        )
    return mine.status == theirs.status and set(mine.advisory_ids) == set(theirs.advisory_ids)


def test_sim_every_tcb_level_agrees_with_dcap_qvl(sim):
    sgxsim = pytest.importorskip("sgxsim")
    for level in sgxsim.TCB_LEVEL_NAMES:
        for ca in ("processor", "platform"):
            quote = sim.make_quote(b"\x07" * 64, tcb=level, ca=ca)
            mine, theirs = sim_verdicts(sim, quote, sim.collateral(ca=ca))
            assert not isinstance(mine, Exception), (level, mine)
            assert mine.status == level and mine.platform_status == level and mine.qe_status == "UpToDate"
            assert verdicts_agree(mine, theirs), (level, ca, mine, theirs)
    quote = sim.make_quote(bytes(64), tcb=sgxsim.BELOW_ALL_LEVELS)
    mine, theirs = sim_verdicts(sim, quote, sim.collateral())
    assert isinstance(mine, dcap.VerificationError) and mine.check == "tcb_level"
    assert isinstance(theirs, Exception)


def test_sim_debug_and_revoked_are_results(sim):
    mine, theirs = sim_verdicts(sim, sim.make_quote(bytes(64), debug=True), sim.collateral())
    assert mine.debug and mine.status == "UpToDate" and "Debug mode" in str(theirs)
    mine, theirs = sim_verdicts(sim, sim.make_quote(bytes(64), tcb="Revoked"), sim.collateral())
    assert mine.status == "Revoked" and isinstance(theirs, Exception)


def test_sim_mutations_agree_with_dcap_qvl(sim):
    """Systematic mutations: both reject, each for its own named check here."""
    import time

    sgxsim = pytest.importorskip("sgxsim")
    now = int(time.time())
    issue = now - 3600
    good = sim.make_quote(bytes(64))
    coll = sim.collateral()
    pck_serial = x509.load_pem_x509_certificate(sim.pck_chain_pem()).serial_number
    tcb_other_fmspc = sim.tcb_info_dict(issue=issue)
    tcb_other_fmspc["fmspc"] = "00C0FFEE0001"
    qe_ident = sim.qe_identity_dict(issue=issue)
    hdr = bytearray(good)
    hdr[12] ^= 1
    wrong_vendor = sim.resign_quote(bytes(hdr))
    cases = {
        "pck_revoked": (good, sim.build_collateral(issue=issue, revoked_pck_serials=[pck_serial])),
        "intermediate_revoked": (
            good,
            sim.build_collateral(issue=issue, revoked_ca_serials=[sim.serial("processor_ca")]),
        ),
        "tcb_info_mismatch": (good, sim.build_collateral(issue=issue, tcb_info=tcb_other_fmspc)),
        "tcb_info_expired": (
            good,
            sim.build_collateral(
                issue=issue, tcb_info=sim.tcb_info_dict(issue=issue - 90000, next_update=now - 10)
            ),
        ),
        "qe_identity_not_yet_valid": (
            good,
            sim.build_collateral(
                issue=issue, qe_identity=sim.qe_identity_dict(issue=now + 100, next_update=now + 9000)
            ),
        ),
        "pck_crl_expired": (
            good,
            sim.build_collateral(
                issue=issue, pck_crl=sim.make_crl("processor", this_update=now - 9000, next_update=now - 1)
            ),
        ),
        "root_ca_crl_expired": (
            good,
            sim.build_collateral(
                issue=issue, root_ca_crl=sim.make_crl("root", this_update=now - 9000, next_update=now - 1)
            ),
        ),
        "pck_crl": (
            good,
            sim.build_collateral(issue=issue, pck_crl=sim.make_crl("processor", key="platform_ca")),
        ),
        "qe_vendor_id": (wrong_vendor, coll),
        "qe_mrsigner": (sim.make_quote(bytes(64), qe_report_overrides={"mr_signer": b"\x01" * 32}), coll),
        "qe_isvprodid": (sim.make_quote(bytes(64), qe_report_overrides={"isv_prod_id": 9}), coll),
        "qe_miscselect": (sim.make_quote(bytes(64), qe_report_overrides={"misc_select": 1}), coll),
        "qe_attributes": (
            sim.make_quote(
                bytes(64),
                qe_report_overrides={"attributes": bytes.fromhex("1300000000000000e700000000000000")},
            ),
            coll,
        ),
        "qe_tcb_level": (sim.make_quote(bytes(64), qe_svn=0), coll),
        "qe_identity_mismatch": (
            good,
            sim.build_collateral(issue=issue, qe_identity={**qe_ident, "id": "QVE"}),
        ),
    }
    for check, (quote, collateral) in cases.items():
        mine, theirs = sim_verdicts(sim, quote, collateral, now)
        assert isinstance(mine, dcap.VerificationError) and mine.check == check, (check, mine)
        assert verdicts_agree(mine, theirs), (check, theirs)
    for edit, at, value in (("version", 0, b"\x05\x00"), ("key_type", 2, b"\x03\x00")):
        raw = bytearray(good)
        raw[at : at + 2] = value
        mine, theirs = sim_verdicts(sim, sim.resign_quote(bytes(raw)), coll, now)
        assert isinstance(mine, dcap_quote.QuoteError) and isinstance(theirs, Exception), edit
    assert sgxsim.TCB_LEVEL_NAMES


def test_tcb_info_v2_is_supported(sim):
    """TCB info v2 (older collateral: "sgxtcbcomp01svn".."16", no id) gives the same verdicts as v3.
    dcap-qvl 0.7.0 cannot parse v2 at all ("missing field sgxtcbcomponents")."""
    import time

    sgxsim = pytest.importorskip("sgxsim")
    issue = int(time.time()) - 3600
    v3 = sim.tcb_info_dict(issue=issue)
    v2 = {k: v for k, v in v3.items() if k not in ("id", "tcbType")}
    v2["version"] = 2
    v2["tcbLevels"] = []
    for lv in v3["tcbLevels"]:
        tcb = {f"sgxtcbcomp{i + 1:02d}svn": c["svn"] for i, c in enumerate(lv["tcb"]["sgxtcbcomponents"])}
        tcb["pcesvn"] = lv["tcb"]["pcesvn"]
        v2["tcbLevels"].append({"tcb": tcb, "tcbDate": lv["tcbDate"], "tcbStatus": lv["tcbStatus"]})
    coll = sim.build_collateral(issue=issue, tcb_info=v2)
    for level in sgxsim.TCB_LEVEL_NAMES:
        mine, theirs = sim_verdicts(sim, sim.make_quote(bytes(64), tcb=level), coll)
        assert not isinstance(mine, Exception), mine
        assert mine.status == level
        assert isinstance(theirs, Exception) and "sgxtcbcomponents" in str(theirs)
    assert dcap.parse_tcb_info(coll.tcb_info).version == 2


def test_qvl_requires_crl_number_and_authority_key_identifier(sim):
    """Intel QVL (PckCrlVerifier, CRL_REQUIRED_EXTENSIONS) refuses a CRL without the CRL Number or the
    Authority Key Identifier extension.  dcap-qvl 0.7.0 refuses a CRL with no extensions at all, but
    accepts one that has only one of the two."""
    import time

    from cryptography.hazmat.primitives import hashes as h

    now = int(time.time())
    ca_key = sim._keys["processor_ca"]  # the sim's own CA key, to sign a CRL shaped differently
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    quote = sim.make_quote(bytes(64))
    for extensions, qvl_accepts in (((), False), ((x509.CRLNumber(1),), True), ((aki,), True)):
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(sim.certificate("processor_ca").subject)
            .last_update(datetime.fromtimestamp(now - 3600, UTC))
            .next_update(datetime.fromtimestamp(now + 86400, UTC))
        )
        for ext in extensions:
            builder = builder.add_extension(ext, critical=False)
        der = builder.sign(ca_key, h.SHA256()).public_bytes(serialization.Encoding.DER)
        coll = sim.build_collateral(issue=now - 3600, pck_crl=der)
        mine, theirs = sim_verdicts(sim, quote, coll, now)
        assert (
            isinstance(mine, dcap.VerificationError) and mine.check == "pck_crl" and "extension" in str(mine)
        )
        assert isinstance(theirs, Exception) is not qvl_accepts, (extensions, theirs)


def test_qvl_compares_qe_identity_values_unmasked(sim):
    """Intel QVL EnclaveReportVerifier compares (report & mask) with the identity's value as written;
    dcap-qvl masks both sides.  An identity whose attributes / miscselect have bits outside the mask
    can never match under Intel's rule, while dcap-qvl accepts."""
    import time

    issue = int(time.time()) - 3600
    quote = sim.make_quote(bytes(64))
    base = sim.qe_identity_dict(issue=issue)
    attrs = bytearray.fromhex(base["attributes"])
    attrs[0] |= 0x04  # bit 2: cleared by the mask FB...
    for edit, check in (
        ({"attributes": attrs.hex().upper()}, "qe_attributes"),
        ({"miscselect": "01000000", "miscselectMask": "FEFFFFFF"}, "qe_miscselect"),
    ):
        coll = sim.build_collateral(issue=issue, qe_identity={**base, **edit})
        mine, theirs = sim_verdicts(sim, quote, coll)
        assert isinstance(mine, dcap.VerificationError) and mine.check == check, mine
        assert not isinstance(theirs, Exception), theirs


def test_tcb_info_signed_by_another_certificate_of_the_root(sim):
    """Intel QVL (TCBSigningChain) requires "SGX TCB Signing" in the signer's CN; TCB info signed by
    another certificate of the same root (here the PCK Processor CA) is refused."""
    import time

    issue = int(time.time()) - 3600
    good = sim.build_collateral(issue=issue)
    text, sig = sim.sign_json(good.tcb_info, key="processor_ca")
    coll = dataclasses.replace(
        good,
        tcb_info=text,
        tcb_info_signature=sig,
        tcb_info_issuer_chain=sim.pck_crl_issuer_chain_pem("processor"),
    )
    mine, theirs = sim_verdicts(sim, sim.make_quote(bytes(64)), coll)
    assert isinstance(mine, dcap.VerificationError) and mine.check == "tcb_info_chain", mine
    assert isinstance(theirs, Exception)  # dcap-qvl refuses it too (a CA certificate as end entity)


def test_sgx_extension_reader_refuses_duplicates_and_gaps():
    q = dcap_quote.parse_quote((SAMPLES / "intel-sgx-v3" / "quote.bin").read_bytes())
    pem = q.signature.certification_data.data.split(b"-----END CERTIFICATE-----")[0]
    leaf = x509.load_pem_x509_certificate(pem + b"-----END CERTIFICATE-----\n")
    ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(dcap.SGX_EXTENSION_OID)).value.value
    _, start, end = dcap.der_tlv(ext, 0, len(ext))
    entries = [
        ext[s - (2 if e - s < 128 else 2 + (e - s).bit_length() // 8 + 1) : e]
        for _, s, e in dcap.der_children(ext, start, end)
    ]
    assert b"".join(entries) == ext[start:end]

    def wrap(body: bytes) -> bytes:
        n = len(body)
        return (
            b"\x30"
            + (
                bytes([n])
                if n < 128
                else bytes([0x80 | ((n.bit_length() + 7) // 8)])
                + n.to_bytes((n.bit_length() + 7) // 8, "big")
            )
            + body
        )

    assert dcap.parse_sgx_extension(wrap(b"".join(entries))).fmspc.hex() == "00a067110000"
    with pytest.raises(ValueError, match="duplicate"):
        dcap.parse_sgx_extension(wrap(b"".join(entries) + entries[3]))
    with pytest.raises(ValueError, match="FMSPC"):
        dcap.parse_sgx_extension(wrap(b"".join(entries[:3] + entries[4:])))
