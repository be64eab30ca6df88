"""RA-TLS with TDX quotes: made (DICE tagged evidence, CBOR tag 60000) and verified to an Identity with
the TD's fields; real TD quotes wrapped in certificates are genuine quotes refused at the binding step."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import dcap
import dcap_quote
import ratls
import ratls_attest
import sgxsim
from dcap_collateral import Collateral

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"
REAL_TDX = sorted(p for p in (SAMPLES / "real-dcap" / "tdx").iterdir() if (p / "expected.json").is_file())
RTMRS = tuple(hashlib.sha384(bytes([i])).digest() for i in range(4))


class TdProvider:
    name = "sim-td"

    def __init__(self, plat: sgxsim.SimPlatform, **kw) -> None:
        self.plat, self.kw = plat, kw

    def get_quote(self, report_data: bytes) -> bytes:
        return self.plat.make_td_quote(bytes(report_data), **self.kw)


@pytest.fixture(scope="module")
def verifier(sim_platform) -> dcap.Verifier:
    return dcap.Verifier(sim_platform.tdx_collateral(), root_ca=sim_platform.root_ca_der)


def cert_with(key, *extensions: tuple[str, bytes]) -> bytes:
    """A self-signed certificate of `key` carrying the given (OID, value) extensions."""
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "td")])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).serial_number(7)
         .public_key(key.public_key()).not_valid_before(now - dt.timedelta(minutes=1))
         .not_valid_after(now + dt.timedelta(hours=1)))
    for oid, value in extensions:
        b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), False)
    from cryptography.hazmat.primitives import serialization

    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def dice(quote: bytes, claims: bytes) -> tuple[str, bytes]:
    return ratls_attest.OID_TCG_DICE_TAGGED_EVIDENCE, ratls_attest.dice_evidence(quote, claims)


@pytest.mark.parametrize("fmt", ratls_attest.FORMATS)
def test_td_certificate_in_every_format_verifies_to_the_td_identity(sim_platform, verifier, fmt):
    der, key = ratls_attest.make_certificate(TdProvider(sim_platform, rtmrs=RTMRS), fmt=fmt)
    ident = ratls.verify_evidence(der, verifier)
    assert (ident.tee, ident.evidence_format, ident.tcb_status) == ("tdx", fmt, "UpToDate")
    assert ident.mr_td == sgxsim.DEFAULT_MR_TD and ident.rtmrs == RTMRS
    assert ident.mr_enclave == b"" and ident.mr_signer == b"" and ident.debug is False
    assert ident.td_attributes == sgxsim.DEFAULT_TD_ATTRIBUTES and len(ident.xfam) == 8
    assert ident.public_key.public_numbers() == key.public_key().public_numbers()
    d = ident.to_dict()
    assert d["tee"] == "tdx" and d["mr_td"] == sgxsim.DEFAULT_MR_TD.hex() and d["rtmr3"] == RTMRS[3].hex()
    assert "mr_enclave" not in d


def test_dice_td_evidence_is_tag_60000_with_a_tdx_quote(sim_platform):
    der, _ = ratls_attest.make_certificate(TdProvider(sim_platform), fmt="dice")
    ext = x509.load_der_x509_certificate(der).extensions.get_extension_for_oid(
        x509.ObjectIdentifier(ratls_attest.OID_TCG_DICE_TAGGED_EVIDENCE))
    item = cbor2.loads(ext.value.value)
    assert item.tag == ratls_attest.CBOR_TAG_INTEL_TEE_QUOTE == 60000
    quote, claims = item.value
    assert dcap_quote.parse_quote(quote).header.tee_type == dcap_quote.TEE_TDX == 0x81
    assert dcap_quote.parse_quote(quote).report.report_data[:32] == hashlib.sha256(claims).digest()


def test_sgx_certificate_identity_says_sgx(sim_platform):
    der, _ = ratls_attest.make_certificate(attester_sim(sim_platform), fmt="dice")
    sgx_verifier = dcap.Verifier(sim_platform.collateral(), root_ca=sim_platform.root_ca_der)
    ident = ratls.verify_evidence(der, sgx_verifier)
    assert ident.tee == "sgx" and ident.mr_td == b"" and ident.rtmrs == ()
    assert ident.mr_enclave == sgxsim.DEFAULT_MR_ENCLAVE


def attester_sim(plat):
    return sgxsim.SimProvider(plat.directory)


@pytest.mark.parametrize(("alg", "hash_fn"), [(1, hashlib.sha256), (7, hashlib.sha384), (8, hashlib.sha512)])
def test_dice_claims_with_every_required_hash(sim_platform, verifier, alg, hash_fn):
    """CCC interoperable RA-TLS: verifiers support hash-alg-id 1, 7 and 8 for pubkey-hash."""
    key = ec.generate_private_key(ec.SECP384R1())
    spki = ratls_attest.spki_der(key.public_key())
    claims = cbor2.dumps({"pubkey-hash": cbor2.dumps([alg, hash_fn(spki).digest()])})
    quote = sim_platform.make_td_quote(hashlib.sha256(claims).digest() + bytes(32))
    der = cert_with(key, dice(quote, claims))
    assert ratls.verify_evidence(der, verifier).tee == "tdx"


def test_td_quote_binding_another_key_is_refused(sim_platform, verifier):
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    quote = sim_platform.make_td_quote(ratls_attest.pubkey_hash(other.public_key()) + bytes(32))
    with pytest.raises(ratls.EvidenceError) as info:
        ratls.verify_evidence(cert_with(key, (ratls_attest.OID_CCZOO_QUOTE, quote)), verifier)
    assert info.value.step == "binding"
    claims = ratls_attest.dice_claims(other.public_key())  # claims of the other key, quote binds them
    quote = sim_platform.make_td_quote(hashlib.sha256(claims).digest() + bytes(32))
    der = cert_with(key, dice(quote, claims))
    with pytest.raises(ratls.EvidenceError, match="another public key") as info:
        ratls.verify_evidence(der, verifier)
    assert info.value.step == "binding"


@pytest.mark.parametrize("case", REAL_TDX, ids=[p.name for p in REAL_TDX])
@pytest.mark.parametrize("shape", ["cczoo", "dice"])
def test_real_td_quote_wrapped_in_a_certificate_is_parsed_and_refused_at_binding(case, shape):
    """A real TD quote is genuine, but its report_data binds no key of ours: the certificate is read,
    the quote parsed, and the evidence refused at the binding step, before any verdict."""
    quote = (case / "quote.bin").read_bytes()
    exp = json.loads((case / "expected.json").read_text())
    key = ec.generate_private_key(ec.SECP384R1())
    if shape == "cczoo":
        der = cert_with(key, (ratls_attest.OID_CCZOO_QUOTE, quote))
    else:
        claims = ratls_attest.dice_claims(key.public_key())
        der = cert_with(key, dice(quote, claims))
    root = (SAMPLES / "real-dcap" / "IntelSGXRootCA.der").read_bytes()
    verifier = dcap.Verifier(Collateral.from_json((case / "collateral.json").read_text()), root_ca=root)
    with pytest.raises(ratls.EvidenceError, match="report_data is not SHA256 of") as info:
        ratls.verify_evidence(der, verifier, now=exp["now"])
    assert info.value.step == "binding"
    # the same quote on its own is a TD quote with the fields its source recorded
    assert dcap_quote.parse_quote(quote).report.mr_td.hex() == exp["mr_td"]


# --- dstack's TDX RA-TLS certificates (read only) ------------------------------------------------------


DSTACK_OID = x509.ObjectIdentifier(ratls.OID_DSTACK_QUOTE)


def dstack_cert(key, quote: bytes, *, ca_key=None, wrap: bytes | None = None) -> bytes:
    """A certificate shaped as dstack's ra-tls cert.rs writes it: signed by the app's CA, extension
    1.3.6.1.4.1.62397.1.1 = DER OCTET STRING(quote)."""
    from cryptography.hazmat.primitives import serialization
    from der_writer import tlv

    ca_key = ca_key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "RA-TLS TEMP Cert")])
    issuer = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "Dstack App CA")])
    now = dt.datetime.now(dt.UTC)
    value = tlv(0x04, quote) if wrap is None else wrap
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).serial_number(9)
            .public_key(key.public_key()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.UnrecognizedExtension(DSTACK_OID, value), False)
            .sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def test_dstack_certificate_verifies_to_the_td_identity(sim_platform, verifier):
    key = ec.generate_private_key(ec.SECP256R1())
    rd = hashlib.sha512(b"ratls-cert:" + ratls_attest.spki_der(key.public_key())).digest()
    ident = ratls.verify_evidence(dstack_cert(key, sim_platform.make_td_quote(rd, rtmrs=RTMRS)), verifier)
    assert (ident.tee, ident.evidence_format) == ("tdx", "dstack")
    assert (ident.mr_td, ident.rtmrs) == (sgxsim.DEFAULT_MR_TD, RTMRS)
    assert ident.report_data == rd == ratls.dstack_report_data(ratls_attest.spki_der(key.public_key()))


def test_dstack_quote_binding_another_key_is_refused(sim_platform, verifier):
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    rd = ratls.dstack_report_data(ratls_attest.spki_der(other.public_key()))
    with pytest.raises(ratls.EvidenceError, match=r'not SHA512\("ratls-cert:"') as info:
        ratls.verify_evidence(dstack_cert(key, sim_platform.make_td_quote(rd)), verifier)
    assert info.value.step == "binding"
    # sha256-style binding (first 32 bytes only) is not dstack's: refused too
    half = hashlib.sha256(ratls_attest.spki_der(key.public_key())).digest() + bytes(32)
    with pytest.raises(ratls.EvidenceError, match="binding"):
        ratls.verify_evidence(dstack_cert(key, sim_platform.make_td_quote(half)), verifier)


@pytest.mark.parametrize("wrap", [b"", b"\x04\x00", b"\x30\x03\x04\x01\x00", b"\x04\x81\x01\x00",
                                  b"\x04\x01\x00\x00"])
def test_dstack_extension_must_be_one_octet_string(verifier, wrap):
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ratls.EvidenceError) as info:
        ratls.verify_evidence(dstack_cert(key, b"", wrap=wrap), verifier)
    assert info.value.step == "dstack_evidence", info.value


def test_a_self_issued_dstack_shaped_certificate_must_be_self_signed(sim_platform, verifier):
    """Only a CA-issued dstack certificate is read without a self-signature; a self-issued one signed
    by another key is refused like any other."""
    key = ec.generate_private_key(ec.SECP256R1())
    rd = ratls.dstack_report_data(ratls_attest.spki_der(key.public_key()))
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "same")])
    now = dt.datetime.now(dt.UTC)
    from cryptography.hazmat.primitives import serialization
    from der_writer import tlv

    der = (x509.CertificateBuilder().subject_name(name).issuer_name(name).serial_number(3)
           .public_key(key.public_key()).not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
           .add_extension(x509.UnrecognizedExtension(DSTACK_OID, tlv(0x04, sim_platform.make_td_quote(rd))),
                          False)
           .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
           .public_bytes(serialization.Encoding.DER))
    with pytest.raises(ratls.EvidenceError) as info:
        ratls.verify_evidence(der, verifier)
    assert info.value.step == "certificate_signature"


@pytest.mark.parametrize("case", REAL_TDX, ids=[p.name for p in REAL_TDX])
def test_real_td_quote_in_dstack_form_is_refused_at_binding(case):
    quote = (case / "quote.bin").read_bytes()
    exp = json.loads((case / "expected.json").read_text())
    root = (SAMPLES / "real-dcap" / "IntelSGXRootCA.der").read_bytes()
    verifier = dcap.Verifier(Collateral.from_json((case / "collateral.json").read_text()), root_ca=root)
    with pytest.raises(ratls.EvidenceError, match="dstack quote's report_data") as info:
        der = dstack_cert(ec.generate_private_key(ec.SECP256R1()), quote)
        ratls.verify_evidence(der, verifier, now=exp["now"])
    assert info.value.step == "binding"


# --- ratls.py verify with TD reference values ----------------------------------------------------------


def test_ratls_verify_cli_appraises_a_td(sim_platform, tmp_path, capsys):
    der, _ = ratls_attest.make_certificate(TdProvider(sim_platform, rtmrs=RTMRS), fmt="dice")
    cert = tmp_path / "td.pem"
    cert.write_bytes(ratls_attest.cert_to_pem(der))
    coll = tmp_path / "tdx_collateral.json"
    coll.write_text(sim_platform.tdx_collateral().to_json())
    root = sim_platform.directory / "root_ca.pem"
    base = ["verify", str(cert), "--collateral", str(coll), "--root-ca", str(root), "--json"]

    def verify(*extra: str) -> tuple[int, dict]:
        code = ratls.main([*base, *extra])
        return code, json.loads(capsys.readouterr().out)

    code, out = verify("--mr-td", sgxsim.DEFAULT_MR_TD.hex(), "--rtmr", f"2={RTMRS[2].hex()}")
    assert code == 0 and out["accepted"] and out["identity"]["tee"] == "tdx"
    code, out = verify("--mr-td", sgxsim.DEFAULT_MR_TD.hex(), "--rtmr", f"2={RTMRS[1].hex()}")
    assert code == 1 and out["reason"] == f"rtmr2 {RTMRS[2].hex()} not in policy"
    code, out = verify("--mr-enclave", sgxsim.DEFAULT_MR_ENCLAVE.hex())
    assert code == 1 and out["reason"] == "a TD cannot be an SGX app"
    assert ratls.main([*base, "--mr-td", sgxsim.DEFAULT_MR_TD.hex(), "--mr-signer", "00" * 32]) == 2
    assert "an enclave's, not with --mr-td" in capsys.readouterr().err
