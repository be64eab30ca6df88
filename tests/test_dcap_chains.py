"""Certificate paths (x509_chain, through dcap's chain checks) and the QE's own attributes.

Chains are built from the certificates given, by name and key, in any order, ignoring extras, and
validated as RFC 5280 asks (basic constraints, path length, key usage, unknown critical extensions,
signatures, validity), with Intel's rules on top (the root inside the chain and byte-identical to the
trusted root).  Bad PKIs come from sgxsim with genuine signatures, so each case meets the rule it aims
at; real chains come from ../shared/samples.

Every case is judged by dcap-qvl too.  Where it decides otherwise, the case is named in DIFFERENCES
(dcap.py follows Intel's QVL) or STRICTER (dcap.py applies an RFC 5280 rule that neither Intel's QVL
library nor dcap-qvl checks, as the issue asks), with the reason; both outcomes are asserted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509

import dcap
import dcap_quote
import sgxsim
import x509_chain

NOW = int(time.time())
RD = bytes(range(64))
UNKNOWN_CRITICAL = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
_NO_USAGE = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                 encipher_only=False, decipher_only=False)


def usage(**bits: bool) -> x509.KeyUsage:
    return x509.KeyUsage(**{**_NO_USAGE, **bits})


LEAF_USAGE = usage(digital_signature=True, content_commitment=True)


def run_dcap(quote: bytes, coll: dcap.Collateral, root: bytes, now: int = NOW) -> tuple[str, str]:
    """("accept", status) or ("reject", check), plus the message for assertions."""
    try:
        v = dcap.verify(quote, coll, root_ca=root, now=now)
    except dcap.VerificationError as exc:
        return "reject", exc.check + " | " + exc.reason
    return "accept", v.status


def run_qvl(quote: bytes, coll: dcap.Collateral, root: bytes, now: int = NOW) -> tuple[str, str]:
    try:
        qcoll = dcap_qvl.QuoteCollateralV3.from_json(coll.to_json())
        r = dcap_qvl.verify_with_root_ca(quote, qcoll, root, now)
    except Exception as exc:  # dcap-qvl raises ValueError/RuntimeError with a message
        text = str(exc)
        # dcap-qvl refuses a debug *application* enclave last, after the chain passed: for the chain
        # that is acceptance (dcap.py reports debug=True and leaves the refusal to the appraisal).
        return ("chain-accepted", text) if "Debug mode is enabled" in text and "QE report" not in text \
            else ("reject", text)
    return "accept", r.status


def pem_chain(pems: list[bytes], order: tuple[int, ...]) -> bytes:
    return b"".join(pems[i] for i in order)


def split_pem(text: str | bytes) -> list[bytes]:
    """PEM certificates of a chain, each ending in a newline (trailing NUL of quote data dropped)."""
    raw = text.encode() if isinstance(text, str) else text
    end = b"-----END CERTIFICATE-----"
    parts = [p.strip(b"\x00\n ") for p in raw.split(end)]
    return [p + b"\n" + end + b"\n" for p in parts if p]


# ---------------------------------------------------------------------------------------------------
# simulated PKI: one case per rule
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    quote: bytes
    coll: dcap.Collateral
    dcap: str            # "accept" or the VerificationError.check dcap.py must refuse with
    reason: str = ""     # a phrase the refusal must contain (names the rule)
    qvl: str = "same"    # "same": dcap-qvl must decide alike; else its outcome ("accept"/"reject")
    why: str = ""        # for a difference: why dcap.py decides as it does


@pytest.fixture(scope="module")
def cases(sim_platform, tmp_path_factory) -> dict[str, Case]:
    plat = sim_platform
    other = sgxsim.SimPlatform.init(tmp_path_factory.mktemp("other-pki"))
    coll = plat.build_collateral(issue=NOW - sgxsim.BACKDATE)
    good = plat.make_quote(RD)
    out: dict[str, Case] = {}

    def pck(name: str, order: tuple[int, ...] = (0, 1, 2), extra: bytes = b"", **kw: object) -> None:
        chain_kw = {k: v for k, v in kw.items() if k in ("leaf", "intermediate", "sub_ca")}
        case_kw = {k: v for k, v in kw.items() if k not in chain_kw}
        pems = plat.reissue_pck_chain(**chain_kw)  # type: ignore[arg-type]
        if "sub_ca" in chain_kw:
            order = (0, 1, 2, 3)
        out[name] = Case(plat.make_quote(RD, pck_chain=pem_chain(pems, order) + extra), coll, **case_kw)

    # order: every permutation of leaf, intermediate, root is accepted
    for perm in itertools.permutations(range(3)):
        leaf_first = perm[0] == 0
        pck(f"pck_chain_order_{''.join(map(str, perm))}", perm, dcap="accept",
            qvl="same" if leaf_first else "reject",
            why="" if leaf_first else "Intel's QVL (CertificateChain::parse) picks the PCK certificate by "
            "its CN phrase wherever it is; dcap-qvl takes the first certificate as the leaf.")
    pck("pck_chain_unrelated_extras", extra=other.pck_chain_pem() + other.tcb_signing_chain_pem().encode(),
        dcap="accept", qvl="reject",
        why="Extras not on the path are ignored (Intel's QVL looks certificates up by name); dcap-qvl "
        "refuses more than its expected number of intermediates.")
    # basic constraints
    pck("pck_leaf_is_ca", leaf={"ca": True, "key_usage": LEAF_USAGE}, dcap="pck_chain",
        reason="basic constraints")
    pck("pck_intermediate_not_ca", intermediate={"ca": False, "path_length": None}, dcap="pck_chain",
        reason="basic constraints")
    pck("pck_intermediate_without_basic_constraints", intermediate={"basic_constraints": False},
        dcap="pck_chain", reason="basic constraints")
    pck("pck_leaf_without_basic_constraints", leaf={"basic_constraints": False}, dcap="accept")
    # path length: a second CA below the intermediate, whose pathLenConstraint is 0
    pck("pck_path_length_exceeded", sub_ca={}, dcap="pck_chain", reason="path length")
    # unknown critical extensions
    pck("pck_leaf_unknown_critical_extension", leaf={"critical_extra": [UNKNOWN_CRITICAL]}, dcap="pck_chain",
        reason="unknown critical extension")
    pck("pck_intermediate_unknown_critical_extension", intermediate={"critical_extra": [UNKNOWN_CRITICAL]},
        dcap="pck_chain", reason="unknown critical extension")
    # key usage
    pck("pck_leaf_key_usage_without_digital_signature", leaf={"key_usage": usage(key_agreement=True)},
        dcap="pck_chain", reason="key usage", qvl="accept",
        why="RFC 5280 4.2.1.3: the PCK key signs the QE report, so a keyUsage without digitalSignature "
        "forbids it; neither Intel's QVL library nor dcap-qvl reads keyUsage.")
    pck("pck_intermediate_key_usage_without_cert_sign",
        intermediate={"key_usage": usage(digital_signature=True, crl_sign=True)}, dcap="pck_chain",
        reason="key usage", qvl="accept",
        why="RFC 5280 4.2.1.3 / 6.1.4 (n): a CA whose keyUsage lacks keyCertSign cannot issue "
        "certificates; neither Intel's QVL library nor dcap-qvl reads keyUsage.")

    # TCB signing chain (TCB info and QE identity)
    for piece, fld in (("tcb_info", "tcb_info_issuer_chain"), ("qe_identity", "qe_identity_issuer_chain")):
        def signing(name: str, chain: str, fld: str = fld, **kw: object) -> None:
            out[name] = Case(good, dataclasses.replace(coll, **{fld: chain}), **kw)  # type: ignore[arg-type]

        root_first = "".join(p.decode() for p in reversed(split_pem(plat.tcb_signing_chain_pem())))
        signing(f"{piece}_chain_root_first", root_first, dcap="accept", qvl="reject",
                why="Intel's TCBSigningChain finds the root and the TCB signing certificate by name; "
                "dcap-qvl takes the first certificate as the signer.")
        signing(f"{piece}_signer_is_ca",
                plat.reissue_tcb_signing_chain(ca=True, path_length=None, key_usage=LEAF_USAGE),
                dcap=f"{piece}_chain", reason="basic constraints")
        signing(f"{piece}_signer_unknown_critical_extension",
                plat.reissue_tcb_signing_chain(critical_extra=[UNKNOWN_CRITICAL]), dcap=f"{piece}_chain",
                reason="unknown critical extension")
        signing(f"{piece}_signer_key_usage_without_digital_signature",
                plat.reissue_tcb_signing_chain(key_usage=usage(key_agreement=True)), dcap=f"{piece}_chain",
                reason="key usage", qvl="accept",
                why="RFC 5280 4.2.1.3: the TCB signing key signs JSON; a keyUsage without "
                "digitalSignature forbids it.  Neither Intel's QVL library nor dcap-qvl reads keyUsage.")

    # PCK CRL issuer chain
    root_first = b"".join(reversed(split_pem(plat.pck_crl_issuer_chain_pem()))).decode()
    out["pck_crl_chain_root_first"] = Case(good, dataclasses.replace(coll, pck_crl_issuer_chain=root_first),
                                           dcap="accept")
    pems = plat.reissue_pck_chain(intermediate={"key_usage": usage(key_cert_sign=True)})
    out["pck_crl_issuer_key_usage_without_crl_sign"] = Case(
        good, dataclasses.replace(coll, pck_crl_issuer_chain=(pems[1] + pems[2]).decode()),
        dcap="pck_crl_chain", reason="cRLSign", qvl="accept",
        why="RFC 5280 6.3.3 (f): a CRL issuer whose keyUsage lacks cRLSign cannot sign CRLs; dcap-qvl never "
        "reads pck_crl_issuer_chain, Intel's QVL library does not read keyUsage.")

    # revocation: the root by its own CRL
    out["root_revoked_by_own_crl"] = Case(
        good, plat.build_collateral(issue=NOW - sgxsim.BACKDATE, revoked_ca_serials=[plat.serial("root")]),
        dcap="root_ca_revoked")
    out["intermediate_revoked_still_refused"] = Case(
        good, plat.build_collateral(issue=NOW - sgxsim.BACKDATE,
                                    revoked_ca_serials=[plat.serial("processor_ca")]),
        dcap="intermediate_revoked")
    return out


def _names() -> list[str]:
    """Case names are fixed at import time so each is its own named test; the fixture must build them."""
    names = ["pck_chain_order_" + "".join(map(str, p)) for p in itertools.permutations(range(3))]
    names += ["pck_chain_unrelated_extras", "pck_leaf_is_ca", "pck_intermediate_not_ca",
              "pck_intermediate_without_basic_constraints", "pck_leaf_without_basic_constraints",
              "pck_path_length_exceeded", "pck_leaf_unknown_critical_extension",
              "pck_intermediate_unknown_critical_extension", "pck_leaf_key_usage_without_digital_signature",
              "pck_intermediate_key_usage_without_cert_sign", "pck_crl_chain_root_first",
              "pck_crl_issuer_key_usage_without_crl_sign", "root_revoked_by_own_crl",
              "intermediate_revoked_still_refused"]
    for piece in ("tcb_info", "qe_identity"):
        names += [f"{piece}_chain_root_first", f"{piece}_signer_is_ca",
                  f"{piece}_signer_unknown_critical_extension",
                  f"{piece}_signer_key_usage_without_digital_signature"]
    return names


def test_case_names_match(cases):
    assert sorted(cases) == sorted(_names())


@pytest.mark.parametrize("name", _names())
def test_chain_case(cases, sim_platform, name):
    """dcap.py's verdict and the rule it names; dcap-qvl's verdict on the same input (the same, or a
    named difference whose reason is in the case)."""
    case = cases[name]
    root = sim_platform.root_ca_der
    outcome, detail = run_dcap(case.quote, case.coll, root)
    if case.dcap == "accept":
        assert outcome == "accept" and detail == "UpToDate", detail
    else:
        assert outcome == "reject" and detail.split(" | ")[0] == case.dcap, detail
        assert case.reason in detail, detail
    qvl, qdetail = run_qvl(case.quote, case.coll, root)
    expected = case.dcap if case.qvl == "same" else case.qvl
    if expected == "accept" or (case.qvl == "same" and case.dcap == "accept"):
        assert qvl == "accept", f"dcap-qvl: {qdetail}"
    else:
        assert qvl == "reject", f"dcap-qvl: {qdetail} ({case.why})"
    assert (case.qvl == "same") == (not case.why), "a difference needs its reason, and only a difference"


ROOT_VARIANTS = {
    "root_control": ({}, "accept", ""),
    "root_without_basic_constraints": ({"basic_constraints": False}, "pck_chain", "basic constraints"),
    "root_not_ca": ({"ca": False, "path_length": None}, "pck_chain", "basic constraints"),
    "root_key_usage_without_cert_sign": ({"key_usage": usage(crl_sign=True)}, "pck_chain", "keyCertSign"),
    "root_key_usage_without_crl_sign": ({"key_usage": usage(key_cert_sign=True)}, "root_ca_crl", "cRLSign"),
    "root_path_length_zero": ({"path_length": 0}, "pck_chain", "path length"),
}


def _with_root(plat: sgxsim.SimPlatform, root_pem: bytes) -> tuple[bytes, dcap.Collateral]:
    """A quote and collateral whose every chain ends in `root_pem` instead of the sim's root."""
    def swap(chain: str | bytes) -> str:
        return b"".join([*split_pem(chain)[:-1], root_pem]).decode()
    coll = plat.build_collateral(issue=NOW - sgxsim.BACKDATE)
    coll = dataclasses.replace(coll, pck_crl_issuer_chain=swap(coll.pck_crl_issuer_chain),
                               tcb_info_issuer_chain=swap(coll.tcb_info_issuer_chain),
                               qe_identity_issuer_chain=swap(coll.qe_identity_issuer_chain))
    return plat.make_quote(RD, pck_chain=swap(plat.pck_chain_pem()).encode()), coll


@pytest.mark.parametrize("name", sorted(ROOT_VARIANTS))
def test_trusted_root_is_held_to_the_ca_rules(sim_platform, name):
    """The trust anchor is an issuer too: pyca applies the CA policy to it (basic constraints, path
    length, keyCertSign) and dcap checks cRLSign on every CRL issuer.  Stricter than both references:
    dcap-qvl (webpki) takes an anchor's name and key only, and Intel's QVL checks the root's self-
    signature and CN only (CommonVerifier::verifyRootCACert); each variant is asserted on both sides."""
    overrides, expect, reason = ROOT_VARIANTS[name]
    root_pem = sim_platform.reissue_root(**overrides)
    root_der = x509.load_pem_x509_certificate(root_pem).public_bytes(dcap.serialization.Encoding.DER)
    quote, coll = _with_root(sim_platform, root_pem)
    outcome, detail = run_dcap(quote, coll, root_der)
    if expect == "accept":
        assert (outcome, detail) == ("accept", "UpToDate")
    else:
        assert outcome == "reject" and detail.startswith(f"{expect} |") and reason in detail, detail
    assert run_qvl(quote, coll, root_der)[0] == "accept"


# ---------------------------------------------------------------------------------------------------
# x509_chain directly: shape and Intel's root rules
# ---------------------------------------------------------------------------------------------------


def _certs(pems: list[bytes]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p) for p in pems]


PCK_SPEC = x509_chain.PathSpec("SGX PCK Certificate", ("CA",))


def test_build_path_returns_leaf_then_intermediate(sim_platform):
    pems = sim_platform.reissue_pck_chain()
    leaf, inter, root = _certs(pems)
    for perm in itertools.permutations((leaf, inter, root)):
        assert x509_chain.build_path(list(perm), root, PCK_SPEC, sim_platform.root_ca_der) == [leaf, inter]


def test_build_path_needs_the_root_in_the_chain(sim_platform):
    leaf, inter, root = _certs(sim_platform.reissue_pck_chain())
    with pytest.raises(x509_chain.ChainError, match="does not include its root CA"):
        x509_chain.build_path([leaf, inter], root, PCK_SPEC, sim_platform.root_ca_der)


def test_build_path_root_must_be_the_trusted_one(sim_platform, tmp_path):
    other = sgxsim.SimPlatform.init(tmp_path)
    leaf, inter, root = _certs(sim_platform.reissue_pck_chain())
    with pytest.raises(x509_chain.ChainError, match="not the trusted root"):
        x509_chain.build_path([leaf, inter, other.certificate("root")], root, PCK_SPEC,
                              sim_platform.root_ca_der)


def test_build_path_shape_is_intels(sim_platform):
    """A TCB signing path (leaf directly under the root) is not a PCK path."""
    root = sim_platform.certificate("root")
    signer = sim_platform.certificate("tcb_signing")
    with pytest.raises(x509_chain.ChainError, match="no certificate whose CN contains"):
        x509_chain.build_path([signer, root], root, PCK_SPEC, sim_platform.root_ca_der)
    spec = x509_chain.PathSpec("SGX TCB Signing", ())
    assert x509_chain.build_path([root, signer], root, spec, sim_platform.root_ca_der) == [signer]


def test_build_path_refuses_a_forged_signature(sim_platform, tmp_path):
    """A leaf with the right names but issued by another platform's intermediate key."""
    other = sgxsim.SimPlatform.init(tmp_path)
    leaf = _certs([split_pem(other.pck_chain_pem())[0]])[0]
    _, inter, root = _certs(sim_platform.reissue_pck_chain())
    renamed = [leaf, inter, root]
    with pytest.raises(x509_chain.ChainError):
        x509_chain.build_path(renamed, root, PCK_SPEC, sim_platform.root_ca_der)


def test_expired_leaf_is_named_by_the_validity_check(sim_platform):
    """A leaf that expired before its CA became valid can never be valid; the path is still handed to
    the per-call validity check, which names the certificate (check pck_chain_expired)."""
    chain = sim_platform.issue_pck_certificate(not_before=NOW - 400 * 86400, not_after=NOW - 300 * 86400)
    quote = sim_platform.make_quote(RD, pck_chain=chain)
    outcome, detail = run_dcap(quote, sim_platform.build_collateral(issue=NOW - sgxsim.BACKDATE),
                               sim_platform.root_ca_der)
    assert outcome == "reject" and detail.startswith("pck_chain_expired"), detail


# ---------------------------------------------------------------------------------------------------
# the QE's own attributes
# ---------------------------------------------------------------------------------------------------


def _debug_qe_quote(plat: sgxsim.SimPlatform) -> bytes:
    attrs = bytearray(sgxsim.QE_REPORT_ATTRIBUTES)
    attrs[0] |= sgxsim.DEBUG_FLAG
    return plat.make_quote(RD, qe_report_overrides={"attributes": bytes(attrs)})


@pytest.mark.parametrize("mask", ["FBFFFFFFFFFFFFFF0000000000000000", "F9FFFFFFFFFFFFFF0000000000000000",
                                  "00000000000000000000000000000000"])
def test_debug_qe_is_refused_whatever_the_mask(sim_platform, mask):
    """Intel's QE identity masks include DEBUG, so Intel's QVL refuses a debug QE as an attributes
    mismatch (EnclaveReportVerifier.cpp 4.1.2.9.6), and so does dcap.py (qe_attributes); under an
    identity whose mask lets it through dcap.py refuses it as qe_debug, and so does dcap-qvl ("Debug
    mode is enabled" on the QE report)."""
    plat = sim_platform
    ident = plat.qe_identity_dict(issue=NOW - sgxsim.BACKDATE, next_update=NOW + 86400)
    ident["attributesMask"] = mask
    ident["attributes"] = bytes(a & m for a, m in zip(bytes.fromhex(ident["attributes"]), bytes.fromhex(mask),
                                                      strict=True)).hex().upper()
    text, sig = plat.sign_json(ident)
    coll = dataclasses.replace(plat.build_collateral(issue=NOW - sgxsim.BACKDATE), qe_identity=text,
                               qe_identity_signature=sig)
    outcome, detail = run_dcap(_debug_qe_quote(plat), coll, plat.root_ca_der)
    # under a mask over DEBUG (Intel's), the attributes comparison refuses first, as in Intel's QVL
    check = "qe_attributes" if bytes.fromhex(mask)[0] & sgxsim.DEBUG_FLAG else "qe_debug"
    assert outcome == "reject" and detail.startswith(f"{check} |"), detail
    qvl, qdetail = run_qvl(_debug_qe_quote(plat), coll, plat.root_ca_der)
    assert qvl == "reject" and "Debug mode" in qdetail, qdetail
    # the same identity accepts the same QE without DEBUG: the refusal is the debug bit, nothing else
    assert run_dcap(plat.make_quote(RD), coll, plat.root_ca_der) == ("accept", "UpToDate")


# ---------------------------------------------------------------------------------------------------
# real chains
# ---------------------------------------------------------------------------------------------------

def _realworld(samples_dir: Path, name: str) -> tuple[bytes, dcap.Collateral, int, bytes]:
    d = samples_dir / "realworld2" / name
    case = json.loads((d / "case.json").read_text())
    root = (d / case["root_ca"]).read_bytes() if case.get("root_ca") else dcap.intel_root_ca()
    return (d / "quote.bin").read_bytes(), dcap.Collateral.from_json((d / "collateral.json").read_text()), \
        case["now"], root


def test_out_of_order_real_chain_is_accepted(samples_dir):
    """fortanix dcap-ql's genuine quote lists leaf, root, intermediate (the issue's case).  Trusting the
    root it carries, it verifies; dcap-qvl accepts its chain too (and refuses only the debug enclave)."""
    quote, coll, now, root = _realworld(samples_dir, "fortanix-dcapql-00906ea1-debug-oldroot")
    certs = _certs(split_pem(dcap_quote.parse_quote(quote).signature.certification_data.data))
    assert [c.subject.rfc4514_string().split("CN=")[1] for c in certs] == [
        "Intel SGX PCK Certificate", "Intel SGX Root CA", "Intel SGX PCK Processor CA"]
    v = dcap.verify(quote, coll, root_ca=root, now=now)
    assert (v.status, v.debug, v.pck_ca) == ("OutOfDate", True, "processor")
    assert run_qvl(quote, coll, root, now)[0] == "chain-accepted"


@pytest.mark.parametrize("name", ["fortanix-dcapql-00906ea1-debug", "fortanix-pcs-00906ea1-debug"])
def test_chain_root_other_than_trusted_root_is_refused(samples_dir, name):
    """Named difference: these quotes carry the 2018 issuance of the Intel SGX Root CA (same name and key
    as the shipped root, another signature).  Intel's PckCertVerifier compares the chain's root with
    the trusted root byte for byte (STATUS_SGX_PCK_CERT_CHAIN_UNTRUSTED); dcap-qvl (webpki) ignores the
    chain's root and reaches its anchor by name and key."""
    quote, coll, now, root = _realworld(samples_dir, name)
    outcome, detail = run_dcap(quote, coll, root, now)
    assert outcome == "reject" and detail.startswith("pck_chain |") and "not the trusted root" in detail
    assert run_qvl(quote, coll, root, now)[0] == "chain-accepted"


def _reordered(quote: bytes, order: tuple[int, ...]) -> bytes:
    q = dcap_quote.parse_quote(quote)
    pems = split_pem(q.signature.certification_data.data)
    data = pem_chain(pems, order) + b"\x00"
    cert_data = dcap.CertificationData(dcap.CERT_PCK_CHAIN, data)
    sig = dataclasses.replace(q.signature, certification_data=cert_data)
    return dcap_quote.Quote(q.header, q.report, sig).to_bytes()


def test_real_chains_in_every_order(samples_dir):
    """Each real SGX sample's PCK chain (certification data is not signed) reordered six ways: the same
    verdict every time; dcap-qvl agrees whenever the leaf comes first."""
    root = (samples_dir / "real-dcap" / "IntelSGXRootCA.der").read_bytes()
    seen = 0
    for d in sorted((samples_dir / "real-dcap").iterdir()):
        if not (d / "quote.bin").is_file():
            continue
        expected = json.loads((d / "expected.json").read_text())
        quote = (d / "quote.bin").read_bytes()
        coll = dcap.Collateral.from_json((d / "collateral.json").read_text())
        base = dcap.verify(quote, coll, root_ca=root, now=expected["now"])
        for perm in itertools.permutations(range(3)):
            q = _reordered(quote, perm)
            v = dcap.verify(q, coll, root_ca=root, now=expected["now"])
            assert (v.status, v.advisory_ids, v.debug) == (base.status, base.advisory_ids, base.debug), d.name
            if perm[0] == 0:
                qvl = run_qvl(q, coll, root, expected["now"])
                assert qvl[0] in ("accept", "chain-accepted"), (d.name, perm, qvl)
            seen += 1
    assert seen >= 6 * 8


def test_real_pck_chains_fit_pycas_profile(samples_dir):
    """The extension policies accept every real Intel PCK chain in the samples (the SGX extension is
    non-critical, no SAN or EKU needed)."""
    seen = 0
    for qp in [*sorted(samples_dir.glob("*/*/quote.bin")), samples_dir / "intel-sgx-v3" / "quote.bin"]:
        try:
            quote = dcap_quote.parse_quote(qp.read_bytes())
        except dcap_quote.QuoteError:
            continue  # TDX and v5 quotes: not this module's
        if quote.signature.certification_data.type != dcap.CERT_PCK_CHAIN:
            continue
        certs = _certs(split_pem(quote.signature.certification_data.data))
        roots = [c for c in certs if c.subject == c.issuer]
        root_der = roots[0].public_bytes(dcap.serialization.Encoding.DER)
        path = x509_chain.build_path(certs, roots[0], PCK_SPEC, root_der)
        assert "SGX PCK Certificate" in path[0].subject.rfc4514_string()
        seen += 1
    assert seen >= 15
