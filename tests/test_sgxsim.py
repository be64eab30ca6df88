"""The simulated SGX platform: its PKI is reused, its collateral looks like Intel's, its quotes verify
against its own root only, and every TCB level it advertises is reachable."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from der_writer import length as der_length

import attester
import dcap
import dcap_quote
import sgxsim
from dcap_collateral import Collateral

PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)
DATE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _pems(data: bytes | str) -> list[x509.Certificate]:
    raw = data.encode() if isinstance(data, str) else data
    return [x509.load_pem_x509_certificate(m) for m in PEM_RE.findall(raw)]


def _verify_raw(cert: x509.Certificate, sig: bytes, data: bytes) -> None:
    """Raises InvalidSignature unless `sig` (r||s) is `cert`'s key's ECDSA-SHA256 over `data`."""
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(der, data, ec.ECDSA(hashes.SHA256()))


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """Top-level TLVs of DER content (enough to walk the SGX extension)."""
    out, pos = [], 0
    while pos < len(data):
        tag, first = data[pos], data[pos + 1]
        pos += 2
        if first & 0x80:
            n = first & 0x7F
            length = int.from_bytes(data[pos:pos + n], "big")
            pos += n
        else:
            length = first
        out.append((tag, data[pos:pos + length]))
        pos += length
    return out


def _oid_str(body: bytes) -> str:
    arcs, acc = [], 0
    for b in body:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(acc)
            acc = 0
    return ".".join(map(str, [arcs[0] // 40, arcs[0] % 40, *arcs[1:]]))


def _ext_shape(ext_value: bytes) -> list[tuple[str, object]]:
    """(OID, value tag or nested shape) for each entry of the SGX extension, in order."""
    shape: list[tuple[str, object]] = []
    ((tag, body),) = _der_items(ext_value)
    assert tag == 0x30
    for seq_tag, pair in _der_items(body):
        assert seq_tag == 0x30
        (oid_tag, oid), (val_tag, val) = _der_items(pair)
        assert oid_tag == 0x06
        if val_tag == 0x30:
            shape.append((_oid_str(oid), _ext_shape(bytes([0x30]) + der_length(len(val)) + val)))
        else:
            shape.append((_oid_str(oid), (val_tag, len(val) if val_tag == 0x04 else None)))
    return shape


def _sgx_ext(cert: x509.Certificate) -> bytes:
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(sgxsim.SGX_EXT_OID))
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    return ext.value.value


def _sample_leaf(samples_dir: Path, case: str) -> x509.Certificate:
    quote = dcap_quote.parse_quote((samples_dir / case / "quote.bin").read_bytes())
    return _pems(quote.signature.certification_data.data)[0]


def _require_verify() -> None:
    if not hasattr(dcap, "verify"):
        pytest.skip("dcap.verify not written yet")


# ---------------------------------------------------------------------------------------------------
# PKI: generated once, reused, fast
# ---------------------------------------------------------------------------------------------------


def test_init_is_fast_and_reuses_keys(tmp_path):
    t0 = time.perf_counter()
    first = sgxsim.SimPlatform.init(tmp_path)
    assert time.perf_counter() - t0 < 2.0
    assert (tmp_path / "root_ca.pem").read_bytes() == first.root_ca_pem
    assert (tmp_path / "platform.json").stat().st_mode & 0o077 == 0, "private keys readable by others"
    collateral_text = (tmp_path / "collateral.json").read_text()
    second = sgxsim.SimPlatform.init(tmp_path)
    assert second.root_ca_der == first.root_ca_der
    assert second.serial("pck_processor_UpToDate") == first.serial("pck_processor_UpToDate")
    assert (tmp_path / "collateral.json").read_text() == collateral_text, "fresh collateral was re-signed"
    other = sgxsim.SimPlatform.init(tmp_path / "other")
    assert other.root_ca_der != first.root_ca_der


def test_init_refreshes_collateral_that_expires_soon(tmp_path):
    plat = sgxsim.SimPlatform.init(tmp_path)
    now = int(time.time())
    # Stored bundle valid for 12 more hours only: init must re-sign, keeping the keys.
    stale = plat.build_collateral(issue=now - sgxsim.COLLATERAL_VALIDITY + 12 * 3600)
    (tmp_path / "collateral.json").write_text(stale.to_json())
    again = sgxsim.SimPlatform.init(tmp_path)
    assert again.root_ca_der == plat.root_ca_der
    fresh = Collateral.from_json((tmp_path / "collateral.json").read_text())
    assert fresh.tcb_info != stale.tcb_info
    next_update = json.loads(fresh.tcb_info)["nextUpdate"]
    assert sgxsim._iso_to_ts(next_update) > now + 29 * 86400


def test_long_running_process_gets_fresh_collateral(tmp_path, monkeypatch):
    plat = sgxsim.SimPlatform.init(tmp_path)
    first = plat.collateral()
    assert plat.collateral() is first  # cached while fresh
    later = time.time() + sgxsim.COLLATERAL_VALIDITY - 3600  # a demo left running for a month
    monkeypatch.setattr(sgxsim.time, "time", lambda: later)
    fresh = plat.collateral()
    assert fresh.tcb_info != first.tcb_info
    assert sgxsim._iso_to_ts(json.loads(fresh.tcb_info)["nextUpdate"]) > later + 29 * 86400
    assert (tmp_path / "collateral.json").read_text() == fresh.to_json()


def test_make_quote_is_fast(sim_platform):
    t0 = time.perf_counter()
    for _ in range(50):
        sim_platform.make_quote(bytes(64))
    assert (time.perf_counter() - t0) / 50 < 0.02


# ---------------------------------------------------------------------------------------------------
# certificates look like Intel's, and say SIMULATED
# ---------------------------------------------------------------------------------------------------


def test_certificates_are_marked_and_shaped_like_intel(sim_platform, samples_dir):
    real_chain = _pems(dcap_quote.parse_quote((samples_dir / "intel-sgx-v3" / "quote.bin").read_bytes())
                       .signature.certification_data.data)
    ours = _pems(sim_platform.pck_chain_pem("UpToDate", "processor"))
    assert len(ours) == len(real_chain) == 3
    for mine, real in zip(ours, real_chain, strict=True):
        cn = mine.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert isinstance(cn, str) and cn.startswith("SIMULATED ")
        assert "Intel Corporation" not in mine.subject.rfc4514_string()
        assert isinstance(mine.public_key(), ec.EllipticCurvePublicKey)
        assert mine.signature_hash_algorithm is not None and mine.signature_hash_algorithm.name == "sha256"
        mine_exts = {e.oid.dotted_string: e.critical for e in mine.extensions}
        real_exts = {e.oid.dotted_string: e.critical for e in real.extensions}
        assert mine_exts == real_exts
        for cls in (x509.BasicConstraints, x509.KeyUsage):
            assert mine.extensions.get_extension_for_class(cls).value == \
                real.extensions.get_extension_for_class(cls).value
    leaf, ca, root = ours
    assert leaf.issuer == ca.subject and ca.issuer == root.subject == root.subject
    leaf.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    tcb_signing, tcb_root = _pems(sim_platform.tcb_signing_chain_pem())
    assert tcb_root == root
    tcb_signing.verify_directly_issued_by(root)


@pytest.mark.parametrize(("ca", "case"), [("processor", "intel-sgx-v3"),
                                          ("platform", "real-dcap/signal-svr2-00606a-2026")])
def test_sgx_extension_layout_matches_real_pck_certificate(sim_platform, samples_dir, ca, case):
    real = _sample_leaf(samples_dir, case)
    assert ("Platform" if ca == "platform" else "Processor") in real.issuer.rfc4514_string()
    mine = sim_platform.pck_certificate("OutOfDate", ca)
    assert _ext_shape(_sgx_ext(mine)) == _ext_shape(_sgx_ext(real))


def test_sgx_extension_values(sim_platform):
    import dcap_qvl

    for name, level in sgxsim.PLATFORMS.items():
        for ca in sgxsim.CA_KINDS:
            pem = sim_platform.pck_chain_pem(name, ca)
            ext = dcap_qvl.parse_pck_extension_from_pem(pem)
            assert ext.fmspc == sim_platform.fmspc
            assert ext.pce_id == sim_platform.pce_id
            assert ext.ppid == sim_platform.ppid
            assert ext.cpu_svn == bytes(level.sgx_svns)
            assert ext.pce_svn == level.pce_svn
            assert ext.sgx_type == (1 if ca == "platform" else 0)
            expected_instance = sim_platform.platform_instance_id if ca == "platform" else None
            assert ext.platform_instance_id == expected_instance


def test_der_encoder_edge_cases():
    assert sgxsim.der_int(0) == b"\x02\x01\x00"
    assert sgxsim.der_int(255) == b"\x02\x02\x00\xff"  # as in real PCK certs (SVN 255)
    assert sgxsim.der_int(128) == b"\x02\x02\x00\x80"
    assert sgxsim.der_oid("1.2.840.113741.1.13.1") == bytes.fromhex("06092a864886f84d010d01")
    long = sgxsim.der_octets(bytes(200))
    assert long[:3] == b"\x04\x81\xc8"


# ---------------------------------------------------------------------------------------------------
# collateral: the real samples' shape, Intel's signing
# ---------------------------------------------------------------------------------------------------


def test_collateral_shape_equals_real_sample(sim_platform, samples_dir):
    real = json.loads((samples_dir / "intel-sgx-v3" / "collateral.json").read_text())
    ours = json.loads((sim_platform.directory / "collateral.json").read_text())
    assert list(ours) == list(real)
    real_tcb, our_tcb = json.loads(real["tcb_info"]), json.loads(ours["tcb_info"])
    assert list(our_tcb) == list(real_tcb)
    assert list(our_tcb["tcbLevels"][1]) == list(real_tcb["tcbLevels"][0])
    assert list(our_tcb["tcbLevels"][0]["tcb"]) == list(real_tcb["tcbLevels"][0]["tcb"])
    assert len(our_tcb["tcbLevels"][0]["tcb"]["sgxtcbcomponents"]) == 16
    real_qe, our_qe = json.loads(real["qe_identity"]), json.loads(ours["qe_identity"])
    assert list(our_qe) == list(real_qe)
    assert list(our_qe["tcbLevels"][0]) == list(real_qe["tcbLevels"][0])
    assert list(our_qe["tcbLevels"][1]) == list(real_qe["tcbLevels"][1])
    for doc in (our_tcb, our_qe):
        assert DATE_RE.match(doc["issueDate"]) and DATE_RE.match(doc["nextUpdate"])
        assert all(DATE_RE.match(level["tcbDate"]) for level in doc["tcbLevels"])
    # Compact JSON, exactly as Intel serves it (the signature covers these bytes).
    assert ours["tcb_info"] == json.dumps(our_tcb, separators=(",", ":"))
    assert our_tcb["fmspc"] == our_tcb["fmspc"].upper() and len(our_tcb["fmspc"]) == 12
    assert [lv["tcbStatus"] for lv in our_tcb["tcbLevels"]] == list(dcap.TCB_STATUSES)
    for key in ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature"):
        assert re.fullmatch(r"[0-9a-f]+", ours[key])
    assert len(bytes.fromhex(ours["tcb_info_signature"])) == 64


def test_collateral_signatures_are_intel_style(sim_platform):
    coll = sim_platform.collateral()
    signing, root = _pems(coll.tcb_info_issuer_chain)
    assert root.subject == _pems(sim_platform.root_ca_pem)[0].subject
    _verify_raw(signing, coll.tcb_info_signature, coll.tcb_info.encode())
    _verify_raw(signing, coll.qe_identity_signature, coll.qe_identity.encode())
    with pytest.raises(InvalidSignature):
        _verify_raw(signing, coll.tcb_info_signature, coll.qe_identity.encode())
    proc_ca, _ = _pems(coll.pck_crl_issuer_chain)
    root_crl = x509.load_der_x509_crl(coll.root_ca_crl)
    pck_crl = x509.load_der_x509_crl(coll.pck_crl)
    assert root_crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert pck_crl.is_signature_valid(proc_ca.public_key())  # type: ignore[arg-type]
    assert not pck_crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert pck_crl.issuer == proc_ca.subject
    for crl in (root_crl, pck_crl):
        assert {e.oid for e in crl.extensions} == {x509.ExtensionOID.CRL_NUMBER,
                                                   x509.ExtensionOID.AUTHORITY_KEY_IDENTIFIER}


def test_revocation_helpers_sign_real_crls(sim_platform):
    serial = sim_platform.serial("pck_processor_UpToDate")
    coll = sim_platform.build_collateral(revoked_pck_serials=[serial],
                                         revoked_ca_serials=[sim_platform.serial("processor_ca")])
    pck_crl = x509.load_der_x509_crl(coll.pck_crl)
    assert pck_crl.get_revoked_certificate_by_serial_number(serial) is not None
    root_crl = x509.load_der_x509_crl(coll.root_ca_crl)
    assert root_crl.get_revoked_certificate_by_serial_number(sim_platform.serial("processor_ca")) is not None
    assert root_crl.is_signature_valid(_pems(sim_platform.root_ca_pem)[0].public_key())  # type: ignore[arg-type]


def test_platform_ca_collateral(sim_platform):
    coll = sim_platform.collateral(ca="platform")
    ca_cert, _ = _pems(coll.pck_crl_issuer_chain)
    assert "Platform" in ca_cert.subject.rfc4514_string()
    assert x509.load_der_x509_crl(coll.pck_crl).issuer == ca_cert.subject
    # Same dates as the stored (processor) bundle.
    stored = json.loads(sim_platform.collateral().tcb_info)
    assert json.loads(coll.tcb_info)["issueDate"] == stored["issueDate"]


# ---------------------------------------------------------------------------------------------------
# quotes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 4])
def test_quote_structure(sim_platform, version):
    rd = bytes(range(64))
    raw = sim_platform.make_quote(rd, mr_enclave=b"\x11" * 32, mr_signer=b"\x22" * 32, isv_prod_id=7,
                                  isv_svn=3, tcb="SWHardeningNeeded", version=version)
    q = dcap_quote.parse_quote(raw)
    assert q.to_bytes() == raw
    assert q.header.version == version and q.header.qe_vendor_id == dcap_quote.INTEL_QE_VENDOR_ID
    assert q.report.report_data == rd and q.report.mr_enclave == b"\x11" * 32
    assert q.report.mr_signer == b"\x22" * 32 and (q.report.isv_prod_id, q.report.isv_svn) == (7, 3)
    assert not q.report.debug
    sig = q.signature
    assert sig.certification_data.type == 5
    chain = _pems(sig.certification_data.data)
    names = ("pck_processor_SWHardeningNeeded", "processor_ca", "root")
    assert [c.serial_number for c in chain] == [sim_platform.serial(n) for n in names]
    # QE report binds the attestation key; PCK leaf signs the QE report; attestation key signs the quote.
    binding = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest()
    assert sig.qe_report.report_data == binding + bytes(32)
    _verify_raw(chain[0], sig.qe_report_signature, sig.qe_report.to_bytes())
    att = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + sig.attestation_key)
    der = encode_dss_signature(int.from_bytes(sig.isv_signature[:32], "big"),
                               int.from_bytes(sig.isv_signature[32:], "big"))
    att.verify(der, q.signed_bytes, ec.ECDSA(hashes.SHA256()))
    assert sig.qe_report.mr_signer == sgxsim.QE_MR_SIGNER
    assert sig.qe_report.isv_prod_id == sgxsim.QE_ISV_PROD_ID


def test_debug_and_attributes(sim_platform):
    q = dcap_quote.parse_quote(sim_platform.make_quote(bytes(64), debug=True))
    assert q.report.debug and q.report.attributes[0] == sgxsim.DEFAULT_ATTRIBUTES[0] | 0x02
    custom = bytes.fromhex("0700000000000000e700000000000000")
    q = dcap_quote.parse_quote(sim_platform.make_quote(bytes(64), attributes=custom))
    assert q.report.attributes == custom and q.report.debug


def test_make_quote_refuses_bad_arguments(sim_platform):
    with pytest.raises(ValueError, match="64 bytes"):
        sim_platform.make_quote(bytes(32))
    with pytest.raises(ValueError, match="unknown sim TCB level"):
        sim_platform.make_quote(bytes(64), tcb="Fine")
    with pytest.raises(ValueError, match="version"):
        sim_platform.make_quote(bytes(64), version=6)


def test_sim_provider(sim_platform):
    prov = sgxsim.SimProvider(sim_platform.directory, mr_enclave=b"\x33" * 32, isv_svn=9, tcb="OutOfDate")
    assert prov.name == "sim"
    q = dcap_quote.parse_quote(prov.get_quote(b"\x44" * 64))
    assert q.report.mr_enclave == b"\x33" * 32 and q.report.isv_svn == 9
    assert q.report.report_data == b"\x44" * 64
    with pytest.raises(attester.ProviderError):
        prov.get_quote(b"short")


# ---------------------------------------------------------------------------------------------------
# verification with dcap.verify (the sim's root only)
# ---------------------------------------------------------------------------------------------------

EXPECTED_STATUS = {level.name: (level.status, set(level.advisory_ids)) for level in sgxsim.TCB_LEVELS}


@pytest.mark.parametrize("tcb", sgxsim.TCB_LEVEL_NAMES)
@pytest.mark.parametrize("version", [3, 4])
def test_every_tcb_level_is_reachable(sim_platform, tcb, version):
    _require_verify()
    raw = sim_platform.make_quote(b"\x5a" * 64, tcb=tcb, version=version)
    result = dcap.verify(raw, sim_platform.collateral(tcb=tcb), root_ca=sim_platform.root_ca_der,
                         now=int(time.time()))
    status, advisories = EXPECTED_STATUS[tcb]
    assert result.status == status
    assert set(result.advisory_ids) == advisories
    assert result.report_data == b"\x5a" * 64
    assert result.mr_enclave == sgxsim.DEFAULT_MR_ENCLAVE
    assert result.fmspc == sim_platform.fmspc
    assert not result.debug


@pytest.mark.parametrize("ca", sgxsim.CA_KINDS)
def test_platform_and_processor_ca_quotes_verify(sim_platform, ca):
    _require_verify()
    raw = sim_platform.make_quote(bytes(64), ca=ca)
    result = dcap.verify(raw, sim_platform.collateral(ca=ca), root_ca=sim_platform.root_ca_pem)
    assert result.status == "UpToDate"


def test_below_all_levels_is_refused(sim_platform):
    _require_verify()
    raw = sim_platform.make_quote(bytes(64), tcb=sgxsim.BELOW_ALL_LEVELS)
    with pytest.raises(dcap.VerificationError):
        dcap.verify(raw, sim_platform.collateral(), root_ca=sim_platform.root_ca_der)


def test_sim_quote_fails_against_intel_root(sim_platform):
    _require_verify()
    raw = sim_platform.make_quote(bytes(64))
    with pytest.raises(dcap.VerificationError):
        dcap.verify(raw, sim_platform.collateral())  # default trust anchor: the Intel SGX Root CA
    with pytest.raises(dcap.VerificationError):
        dcap.verify(raw, sim_platform.collateral(), root_ca=dcap.load_root_ca(None))


def test_sim_root_does_not_verify_intel_quote(sim_platform, samples_dir):
    _require_verify()
    case = samples_dir / "intel-sgx-v3"
    expected = json.loads((case / "expected.json").read_text())
    coll = Collateral.from_json((case / "collateral.json").read_text())
    with pytest.raises(dcap.VerificationError):
        dcap.verify((case / "quote.bin").read_bytes(), coll, root_ca=sim_platform.root_ca_der,
                    now=expected["now"])


def test_reused_directory_quotes_still_verify(tmp_path):
    _require_verify()
    sgxsim.SimPlatform.init(tmp_path)
    plat = sgxsim.SimPlatform.init(tmp_path)  # second process in real life: keys from disk
    coll = Collateral.from_json((tmp_path / "collateral.json").read_text())
    raw = plat.make_quote(bytes(64), tcb="ConfigurationNeeded")
    root = (tmp_path / "root_ca.pem").read_bytes()
    assert dcap.verify(raw, coll, root_ca=root).status == "ConfigurationNeeded"
