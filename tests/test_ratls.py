"""ratls: making, verifying and appraising RA-TLS certificates (real crypto, simulated SGX platform)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import time
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from der_writer import oid_raw, seq, tlv

import attester
import dcap
import dcap_quote
import policy as policy_mod
import ratls
import ratls_attest
from dcap_collateral import Collateral

MR_ENCLAVE = bytes.fromhex("3f2a" + "11" * 28 + "a1b2")
MR_SIGNER = bytes.fromhex("5e" * 32)
OTHER_ENCLAVE = bytes.fromhex("77" * 32)

# -------------------------------------------------------------------------------------------------
# Certificates built the way mbedtls/OpenSSL do, with the tests' own DER writer (tests/der.py).


def extension(oid_content: bytes, value: bytes, critical: bool = False) -> bytes:
    return seq(oid_raw(oid_content), *([tlv(0x01, b"\xff")] if critical else []), tlv(0x04, value))


OID_CCZOO = bytes.fromhex("2a864886f84d01")  # 1.2.840.113741.1
OID_GRAMINE_LEGACY_AS_WRITTEN = bytes.fromhex("06092a864886f84d8a3906")  # ra_tls.h bytes, verbatim
OID_GRAMINE_PROPER = bytes.fromhex("2a864886f84d8a3906")  # 1.2.840.113741.1337.6
OID_DICE = bytes.fromhex("678105050409")  # 2.23.133.5.4.9
ECDSA_SHA256 = seq(oid_raw(bytes.fromhex("2a8648ce3d040302")))  # no parameters (RFC 5758)


def utc_time(t: int) -> bytes:
    return tlv(0x17, dt.datetime.fromtimestamp(t, dt.UTC).strftime("%y%m%d%H%M%SZ").encode())


# mbedtls_x509_string_to_names("CN=RATLS,O=GramineDevelopers,C=US"): UTF8String for CN and O,
# PrintableString for C, written in string order (list is prepended, then written back to front).
GRAMINE_NAME_DER = seq(
    tlv(0x31, seq(oid_raw(bytes.fromhex("550403")), tlv(0x0C, b"RATLS"))),
    tlv(0x31, seq(oid_raw(bytes.fromhex("55040a")), tlv(0x0C, b"GramineDevelopers"))),
    tlv(0x31, seq(oid_raw(bytes.fromhex("550406")), tlv(0x13, b"US"))),
)


def gramine_tbs(key, legacy_quote: bytes, evidence: bytes, not_before: int, not_after: int) -> bytes:
    """TBSCertificate as ra_tls_attest.c's generate_x509() + mbedtls 3.6 x509write_crt write it."""
    pub = key.public_key()
    spki = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    point = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    key_id = hashlib.sha1(point).digest()  # mbedtls: SHA-1 over mbedtls_pk_write_pubkey() output
    exts = seq(
        extension(bytes.fromhex("551d13"), seq()),  # basicConstraints is_ca=0, pathlen -1: non-critical
        extension(bytes.fromhex("551d0e"), tlv(0x04, key_id)),  # subjectKeyIdentifier
        extension(bytes.fromhex("551d23"), seq(tlv(0x80, key_id))),  # authorityKeyIdentifier
        extension(OID_GRAMINE_LEGACY_AS_WRITTEN, legacy_quote),
        extension(OID_DICE, evidence),
    )
    return seq(
        tlv(0xA0, tlv(0x02, b"\x02")),  # v3
        tlv(0x02, b"\x01"),  # serial "1"
        ECDSA_SHA256,  # MBEDTLS_MD_SHA256 whatever the curve
        GRAMINE_NAME_DER,
        seq(utc_time(not_before), utc_time(not_after)),
        GRAMINE_NAME_DER,
        spki,
        tlv(0xA3, exts),
    )


def sign_tbs(tbs: bytes, key) -> bytes:
    """Assemble Certificate ::= SEQUENCE {tbs, signatureAlgorithm, signature BIT STRING}."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        alg = ECDSA_SHA256
    else:
        sig = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
        alg = seq(oid_raw(bytes.fromhex("2a864886f70d01010b")), tlv(0x05, b""))
    return seq(tbs, alg, tlv(0x03, b"\x00" + sig))


def simple_tbs(key, exts: list[bytes], not_before: int, not_after: int) -> bytes:
    """A plain v3 TBSCertificate with the given raw extensions (for crafted evidence)."""
    pub = key.public_key()
    spki = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    name = seq(tlv(0x31, seq(oid_raw(bytes.fromhex("550403")), tlv(0x0C, b"crafted"))))
    alg = ECDSA_SHA256 if isinstance(key, ec.EllipticCurvePrivateKey) else seq(
        oid_raw(bytes.fromhex("2a864886f70d01010b")), tlv(0x05, b"")
    )
    fields = [tlv(0xA0, tlv(0x02, b"\x02")), tlv(0x02, b"\x05"), alg, name,
              seq(utc_time(not_before), utc_time(not_after)), name, spki]
    if exts:
        fields.append(tlv(0xA3, seq(*exts)))
    return seq(*fields)


def crafted_cert(key, exts: list[bytes], now: int | None = None) -> bytes:
    t = int(time.time()) if now is None else now
    return sign_tbs(simple_tbs(key, exts, t - 60, t + 3600), key)


def spki_of(key) -> bytes:
    pub = key.public_key() if hasattr(key, "public_key") else key
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def spki_hash(key) -> bytes:
    return ratls_attest.pubkey_hash(key.public_key())


def rd(first32: bytes) -> bytes:
    return first32 + bytes(32)


# -------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def sim_dir(sim_platform) -> Path:
    return Path(sim_platform.directory)


@pytest.fixture(scope="module")
def verifier(sim_platform):
    return dcap.Verifier(sim_platform.collateral(), root_ca=sim_platform.root_ca_der)


@pytest.fixture(scope="module")
def provider(sim_dir):
    import sgxsim

    def make(**kw):
        kw.setdefault("mr_enclave", MR_ENCLAVE)
        kw.setdefault("mr_signer", MR_SIGNER)
        return sgxsim.SimProvider(sim_dir, **kw)

    return make


@pytest.fixture(scope="module")
def p256(provider):
    """One cczoo P-256 certificate reused by many refusal tests."""
    return ratls_attest.make_certificate(provider(isv_prod_id=7, isv_svn=3), fmt="cczoo")


@pytest.fixture(scope="module")
def gram(provider):
    return ratls_attest.make_certificate(provider(isv_prod_id=7, isv_svn=3), fmt="gramine")


def policy(**kw) -> policy_mod.ReferenceValues:
    d = {"mr_enclave": MR_ENCLAVE.hex(), "mr_signer": MR_SIGNER.hex()}
    d.update(kw)
    return policy_mod.ReferenceValues.from_dict(d)


def ext_value(cert_der: bytes, oid: str) -> bytes:
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value


def evidence_error(cert, verifier, **kw) -> ratls.EvidenceError:
    with pytest.raises(ratls.EvidenceError) as ei:
        ratls.verify_evidence(cert, verifier, **kw)
    return ei.value


# -------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("fmt", ["cczoo", "gramine"])
@pytest.mark.parametrize("key_type", ["p256", "p384", "rsa3072"])
def test_round_trip(provider, verifier, fmt, key_type):
    before = int(time.time())
    der, key = ratls_attest.make_certificate(provider(isv_prod_id=3, isv_svn=9), fmt=fmt, key_type=key_type)
    ident = ratls.verify_evidence(der, verifier)
    assert ident.mr_enclave == MR_ENCLAVE and ident.mr_signer == MR_SIGNER
    assert (ident.isv_prod_id, ident.isv_svn, ident.debug) == (3, 9, False)
    assert ident.tcb_status == "UpToDate"
    assert ident.evidence_format == fmt
    assert spki_of(ident.public_key) == spki_of(key)
    if key_type == "rsa3072":
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    else:
        assert key.curve.name == {"p256": "secp256r1", "p384": "secp384r1"}[key_type]
    assert ident.cert_der == der
    # short validity: one hour after issue (notBefore back-dated one minute for clock skew)
    assert before - 61 <= ident.not_before <= before and ident.not_after - ident.not_before == 3660
    assert ident.collateral_expiry > time.time()
    assert policy(isv_prod_id=3, min_isv_svn=9).appraise(ident) == policy_mod.Decision(True, None)
    # PEM input is accepted too
    assert ratls.verify_evidence(ratls_attest.cert_to_pem(der), verifier).mr_enclave == MR_ENCLAVE


def test_default_key_types(provider):
    _, k1 = ratls_attest.make_certificate(provider(), fmt="cczoo")
    _, k2 = ratls_attest.make_certificate(provider(), fmt="gramine")
    assert k1.curve.name == "secp256r1" and k2.curve.name == "secp384r1"


def test_cczoo_layout(p256):
    der, key = p256
    cert = x509.load_der_x509_certificate(der)
    assert [e.oid.dotted_string for e in cert.extensions] == ["1.2.840.113741.1"]
    assert cert.extensions[0].critical is False
    quote = dcap_quote.parse_quote(ext_value(der, "1.2.840.113741.1"))  # the raw quote is the value
    assert quote.report.report_data == spki_hash(key) + bytes(32)
    assert cert.serial_number == 1
    assert cert.subject == cert.issuer == x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Inc."),
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
        ]
    )
    # cczoo's own reader skips 4 bytes (04 82 LL LL) before the quote: the value is long-form encoded
    i = der.find(bytes.fromhex("06072a864886f84d01"))
    assert der[i + 9 : i + 11] == b"\x04\x82"


def test_cczoo_original_style_certificate(provider, verifier):
    """As sgx_ra_tls_impl.cc writes it: RSA-2048, serial 1, C/O/CN names, no version field (OpenSSL's
    X509_new default, v1), SHA-1 signature, 20-year validity, one non-critical quote extension."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    quote = provider().get_quote(rd(spki_hash(key)))
    name = seq(
        tlv(0x31, seq(oid_raw(bytes.fromhex("550406")), tlv(0x13, b"CN"))),
        tlv(0x31, seq(oid_raw(bytes.fromhex("55040a")), tlv(0x0C, b"Intel Inc."))),
        tlv(0x31, seq(oid_raw(bytes.fromhex("550403")), tlv(0x0C, b"localhost"))),
    )
    sha1_rsa = seq(oid_raw(bytes.fromhex("2a864886f70d010105")), tlv(0x05, b""))
    now = int(time.time())
    validity = seq(utc_time(now), utc_time(now + 630720000))
    exts = tlv(0xA3, seq(extension(OID_CCZOO, quote)))
    tbs = seq(tlv(0x02, b"\x01"), sha1_rsa, name, validity, name, spki_of(key), exts)
    der = seq(tbs, sha1_rsa, tlv(0x03, b"\x00" + key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())))
    assert x509.load_der_x509_certificate(der).version == x509.Version.v1
    ident = ratls.verify_evidence(der, verifier)
    assert ident.evidence_format == "cczoo" and ident.not_after == now + 630720000
    assert policy().appraise(ident).accepted


def test_extra_report_data(provider, verifier):
    der, key = ratls_attest.make_certificate(provider(), extra_report_data=b"nonce-123")
    ident = ratls.verify_evidence(der, verifier)
    assert ident.report_data == spki_hash(key) + b"nonce-123" + bytes(23)


def test_validity_is_configurable_and_bounded(provider):
    der, _ = ratls_attest.make_certificate(provider(), validity_seconds=120, now=1_800_000_000)
    cert = x509.load_der_x509_certificate(der)
    assert cert.not_valid_before_utc.timestamp() == 1_800_000_000 - 60
    assert cert.not_valid_after_utc.timestamp() == 1_800_000_120
    for bad in (0, -5, 20 * 365 * 86400):
        with pytest.raises(ValueError, match="validity"):
            ratls_attest.make_certificate(provider(), validity_seconds=bad)


# -------------------------------------------------------------------------------------------------
# Gramine: byte for byte as ra_tls_attest builds it


def test_gramine_tbs_is_byte_for_byte_ra_tls_attest(gram):
    der, key = gram
    cert = x509.load_der_x509_certificate(der)
    legacy = ext_value(der, "0.6.9.42.840.113741.1337.6")
    evidence = ext_value(der, "2.23.133.5.4.9")
    nb, na = int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp())
    assert cert.tbs_certificate_bytes == gramine_tbs(key, legacy, evidence, nb, na)
    assert cert.signature_algorithm_oid.dotted_string == "1.2.840.10045.4.3.2"

    # the legacy OID appears in the DER exactly as ra_tls.h spells it (tag+length inside the OID)
    assert tlv(0x06, OID_GRAMINE_LEGACY_AS_WRITTEN) in der
    # legacy quote: report_data = SHA256(SPKI) || zeros
    assert dcap_quote.parse_quote(legacy).report.report_data == rd(spki_hash(key))
    # DICE: tag 60000 [bstr quote, bstr claims]; claims = {"pubkey-hash": bstr([1, bstr sha256])}
    assert evidence[:3] == bytes.fromhex("d9ea60") and evidence[3] == 0x82
    tagged = cbor2.loads(evidence)
    quote, claims = tagged.value
    assert claims == (
        b"\xa1\x6bpubkey-hash" + bytes.fromhex("582482015820") + spki_hash(key)
    )
    assert dcap_quote.parse_quote(quote).report.report_data == rd(hashlib.sha256(claims).digest())
    assert quote != legacy  # two quotes: Gramine asks /dev/attestation twice


def test_gramine_cert_built_by_hand_parses_and_binds(provider, verifier):
    """A certificate assembled here from Gramine's recipe alone (no ratls code) is accepted."""
    key = ec.generate_private_key(ec.SECP384R1())
    prov = provider(isv_svn=2)
    legacy = prov.get_quote(rd(spki_hash(key)))
    hash_entry = bytes.fromhex("82015820") + spki_hash(key)
    claims = b"\xa1\x6bpubkey-hash" + b"\x58" + bytes([len(hash_entry)]) + hash_entry
    dice_quote = prov.get_quote(rd(hashlib.sha256(claims).digest()))
    evidence = (
        bytes.fromhex("d9ea6082")
        + b"\x59" + len(dice_quote).to_bytes(2, "big") + dice_quote
        + b"\x58" + bytes([len(claims)]) + claims
    )
    now = int(time.time())
    der = sign_tbs(gramine_tbs(key, legacy, evidence, now - 10, now + 600), key)
    ident = ratls.verify_evidence(der, verifier)
    assert ident.evidence_format == "gramine"
    assert (ident.mr_enclave, ident.isv_svn) == (MR_ENCLAVE, 2)
    assert policy().appraise(ident).accepted


def test_gramine_proper_oid_also_accepted(provider, verifier):
    key = ec.generate_private_key(ec.SECP384R1())
    quote = provider().get_quote(rd(spki_hash(key)))
    ident = ratls.verify_evidence(crafted_cert(key, [extension(OID_GRAMINE_PROPER, quote)]), verifier)
    assert ident.evidence_format == "gramine-legacy"
    der = crafted_cert(key, [extension(OID_GRAMINE_LEGACY_AS_WRITTEN, quote)])
    ident = ratls.verify_evidence(der, verifier)
    assert ident.evidence_format == "gramine-legacy"


def test_gramine_extensions_with_different_quotes_refused(provider, verifier):
    key = ec.generate_private_key(ec.SECP384R1())
    claims = ratls_attest.dice_claims(key.public_key())
    dice = ratls_attest.dice_evidence(provider().get_quote(rd(hashlib.sha256(claims).digest())), claims)
    now = int(time.time())
    # legacy quote of another enclave, correctly bound to the same key
    other = provider(mr_enclave=OTHER_ENCLAVE).get_quote(rd(spki_hash(key)))
    der = sign_tbs(gramine_tbs(key, other, dice, now - 10, now + 600), key)
    err = evidence_error(der, verifier)
    assert err.step == "gramine_consistency" and "different enclaves" in str(err)
    # legacy quote bound to another key
    other_key = ec.generate_private_key(ec.SECP384R1())
    stray = provider().get_quote(rd(spki_hash(other_key)))
    der = sign_tbs(gramine_tbs(key, stray, dice, now - 10, now + 600), key)
    err = evidence_error(der, verifier)
    assert err.step == "binding" and "gramine-legacy" in str(err)
    # the same DICE evidence twice is not a pair either
    der = crafted_cert(key, [extension(OID_DICE, dice), extension(OID_DICE, dice)])
    assert "more than once" in str(evidence_error(der, verifier))


def test_dice_claims_of_another_key_refused(provider, verifier):
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    claims = ratls_attest.dice_claims(other.public_key())
    dice = ratls_attest.dice_evidence(provider().get_quote(rd(hashlib.sha256(claims).digest())), claims)
    err = evidence_error(crafted_cert(key, [extension(OID_DICE, dice)]), verifier)
    assert err.step == "binding" and "another public key" in str(err)
    # report_data not the hash of the claims it travels with
    mine = ratls_attest.dice_claims(key.public_key())
    dice = ratls_attest.dice_evidence(provider().get_quote(rd(hashlib.sha256(claims).digest())), mine)
    err = evidence_error(crafted_cert(key, [extension(OID_DICE, dice)]), verifier)
    assert err.step == "binding" and "claims" in str(err)


def _tagged(*items) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(60000, list(items)))


def _claims(entry) -> bytes:
    return cbor2.dumps({"pubkey-hash": cbor2.dumps(entry)})


@pytest.mark.parametrize(
    "build, needle",
    [  # build(mk, claims): mk(c) is a genuine quote whose report_data is SHA256(c)
        (lambda mk, c: cbor2.dumps(cbor2.CBORTag(60001, [mk(c), c])), "tag 60000"),
        (lambda mk, c: _tagged(mk(c)), "2-element"),
        (lambda mk, c: _tagged(mk(c), cbor2.loads(c)), "claims element"),
        (lambda mk, c: _tagged(mk(c), c) + b"\x00", "trailing"),
        (lambda mk, c: _tagged(mk(c), c, b""), "2-element"),
        (lambda mk, c: b"\xd9\xea\x60\x9f" + cbor2.dumps(mk(c)) + cbor2.dumps(c) + b"\xff", "not valid CBOR"),
        (lambda mk, c: _tagged(mk(b"\xa0"), b"\xa0"), "non-empty CBOR map"),
        (lambda mk, c: _tagged(mk(cl := cbor2.dumps({"nonce": b"x"})), cl), "pubkey-hash"),
        (lambda mk, c: _tagged(mk(cl := cbor2.dumps({1: b"x"})), cl), "text strings"),
        (lambda mk, c: _tagged(mk(cl := c + b"\x00"), cl), "trailing"),
        (lambda mk, c: _tagged(mk(cl := _claims([99, b"\x00" * 32])), cl), "hash-alg-id"),
        (lambda mk, c: _tagged(mk(cl := _claims([1, b"\x00" * 31])), cl), "32-byte"),
        (lambda mk, c: _tagged(mk(cl := _claims([1])), cl), "[hash-alg-id, hash]"),
        (lambda mk, c: _tagged(mk(cl := cbor2.dumps({"pubkey-hash": [1, b"\x00" * 32]})), cl), "byte string"),
        (lambda mk, c: _tagged(mk(cl := b"\xa2" + c[1:] + c[1:]), cl), "not valid CBOR"),  # duplicate key
    ],
)
def test_malformed_dice_evidence(provider, verifier, build, needle):
    key = ec.generate_private_key(ec.SECP256R1())
    prov = provider()

    def mk(claims: bytes) -> bytes:
        return prov.get_quote(rd(hashlib.sha256(claims).digest()))

    evidence = build(mk, ratls_attest.dice_claims(key.public_key()))
    err = evidence_error(crafted_cert(key, [extension(OID_DICE, evidence)]), verifier)
    assert needle in str(err)
    assert err.step == "dice_evidence"


def test_dice_sha384_hash_entry_accepted(provider, verifier):
    """Gramine's verifier also takes hash-alg-id 7 (SHA-384) for the key hash."""
    key = ec.generate_private_key(ec.SECP384R1())
    spki = spki_of(key)
    claims = cbor2.dumps({"pubkey-hash": cbor2.dumps([7, hashlib.sha384(spki).digest()])})
    dice = ratls_attest.dice_evidence(provider().get_quote(rd(hashlib.sha256(claims).digest())), claims)
    ident = ratls.verify_evidence(crafted_cert(key, [extension(OID_DICE, dice)]), verifier)
    assert ident.evidence_format == "dice"


# -------------------------------------------------------------------------------------------------
# Genuineness refusals


def test_key_swapped_after_quote_was_made(p256, verifier):
    der, key = p256
    quote = ext_value(der, "1.2.840.113741.1")
    # 1. a new key signs a certificate around the old quote
    new_key = ec.generate_private_key(ec.SECP256R1())
    err = evidence_error(crafted_cert(new_key, [extension(OID_CCZOO, quote)]), verifier)
    assert err.step == "binding" and "public key" in str(err)
    # 2. the SPKI bytes are replaced inside the signed certificate
    swapped = der.replace(spki_of(key), spki_of(new_key))
    assert swapped != der
    err = evidence_error(swapped, verifier)
    assert err.step == "certificate_signature"


def test_quote_taken_from_another_certificate(p256, gram, verifier):
    quote = ext_value(p256[0], "1.2.840.113741.1")
    thief = ec.generate_private_key(ec.SECP256R1())
    der = crafted_cert(thief, [extension(OID_CCZOO, quote)])
    assert evidence_error(der, verifier).step == "binding"
    # Gramine DICE evidence lifted into another certificate: claims name the original key
    dice = ext_value(gram[0], "2.23.133.5.4.9")
    der = crafted_cert(ec.generate_private_key(ec.SECP384R1()), [extension(OID_DICE, dice)])
    err = evidence_error(der, verifier)
    assert err.step == "binding" and "another public key" in str(err)


class _ConstProvider:
    def __init__(self, quote: bytes) -> None:
        self.quote = quote

    def get_quote(self, report_data: bytes) -> bytes:
        return self.quote


def test_provider_returning_wrong_quote_is_caught(p256):
    with pytest.raises(attester.ProviderError, match="different report_data"):
        ratls_attest.make_certificate(_ConstProvider(ext_value(p256[0], "1.2.840.113741.1")))


def test_report_data_of_another_key(provider, verifier):
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    quote = provider().get_quote(rd(spki_hash(other)))
    err = evidence_error(crafted_cert(key, [extension(OID_CCZOO, quote)]), verifier)
    assert err.step == "binding" and "report_data" in str(err)


def test_extension_missing(verifier):
    key = ec.generate_private_key(ec.SECP256R1())
    err = evidence_error(crafted_cert(key, []), verifier)
    assert err.step == "evidence_extension" and "no RA-TLS evidence extension" in str(err)
    der = crafted_cert(key, [extension(bytes.fromhex("2a864886f84d02"), b"x" * 300)])  # 1.2.840.113741.2
    err = evidence_error(der, verifier)
    assert err.step == "evidence_extension"


def test_extension_duplicated(p256, verifier):
    der, key = p256
    quote = ext_value(der, "1.2.840.113741.1")
    der = crafted_cert(key, [extension(OID_CCZOO, quote), extension(OID_CCZOO, quote)])
    err = evidence_error(der, verifier)
    assert err.step == "evidence_extension" and "more than once" in str(err)
    # two quote extensions of different kinds (not Gramine's pair)
    claims = ratls_attest.dice_claims(key.public_key())
    dice = ratls_attest.dice_evidence(quote, claims)
    der = crafted_cert(key, [extension(OID_CCZOO, quote), extension(OID_DICE, dice)])
    err = evidence_error(der, verifier)
    assert err.step == "evidence_extension" and "more than one quote" in str(err)
    # the Gramine legacy OID in both encodings is two quotes as well
    err = evidence_error(
        crafted_cert(
            key, [extension(OID_GRAMINE_PROPER, quote), extension(OID_GRAMINE_LEGACY_AS_WRITTEN, quote)]
        ),
        verifier,
    )
    assert "more than one quote" in str(err)


def test_garbage_quote_and_garbage_certificate(verifier):
    key = ec.generate_private_key(ec.SECP256R1())
    err = evidence_error(crafted_cert(key, [extension(OID_CCZOO, b"\x03\x00" + b"\x00" * 500)]), verifier)
    assert err.step == "quote_parse"
    assert evidence_error(b"not a certificate", verifier).step == "certificate"


def test_quote_not_genuine_wraps_dcap_error(p256, samples_dir):
    intel_only = dcap.Verifier(
        Collateral.from_json((samples_dir / "intel-sgx-v3" / "collateral.json").read_text()),
        root_ca=dcap.intel_root_ca(),
    )
    err = evidence_error(p256[0], intel_only)
    assert err.step == "quote_verification"
    assert isinstance(err.__cause__, dcap.DcapError)


def test_certificate_dates_are_not_genuineness(provider, verifier):
    der, _ = ratls_attest.make_certificate(provider(), validity_seconds=5)
    later = int(time.time()) + 3600
    ident = ratls.verify_evidence(der, verifier, now=later)  # still genuine
    decision = policy().appraise(ident, now=later)
    assert not decision.accepted and decision.reason.startswith("certificate expired")
    decision = policy().appraise(ident, now=ident.not_before - 1)
    assert not decision.accepted and decision.reason.startswith("certificate not yet valid")


# -------------------------------------------------------------------------------------------------
# Appraisal refusals


def test_debug_enclave_refused(provider, verifier):
    ident = ratls.verify_evidence(ratls_attest.make_certificate(provider(debug=True))[0], verifier)
    assert ident.debug is True
    assert policy().appraise(ident) == policy_mod.Decision(False, "debug enclave refused")
    assert policy(allow_debug=True).appraise(ident).accepted


@pytest.mark.parametrize("status", ["SWHardeningNeeded", "OutOfDate", "ConfigurationAndSWHardeningNeeded"])
def test_disallowed_tcb_status(provider, verifier, status):
    ident = ratls.verify_evidence(ratls_attest.make_certificate(provider(tcb=status))[0], verifier)
    assert ident.tcb_status == status
    expected = policy_mod.Decision(False, f"TCB status {status} not allowed for app 2")
    assert policy().appraise(ident, app="2") == expected
    assert policy(allowed_tcb_statuses=["UpToDate", status]).appraise(ident).accepted


def test_revoked_never_allowed(provider, verifier):
    with pytest.raises(policy_mod.ReferenceValuesError, match=r"^allowed_tcb_statuses: Revoked can never be"):
        policy(allowed_tcb_statuses=["UpToDate", "Revoked"])
    with pytest.raises(policy_mod.ReferenceValuesError, match="Revoked"):
        policy_mod.ReferenceValues(mr_enclave=MR_ENCLAVE, allowed_tcb_statuses=frozenset({"Revoked"}))
    # a Revoked platform is refused whatever else the policy allows
    try:
        ident = ratls.verify_evidence(ratls_attest.make_certificate(provider(tcb="Revoked"))[0], verifier)
    except ratls.EvidenceError as e:  # a verifier may already call a revoked TCB not genuine
        assert e.step == "quote_verification"
        ident = dataclasses.replace(
            ratls.verify_evidence(ratls_attest.make_certificate(provider())[0], verifier),
            tcb_status="Revoked"
        )
    assert ident.tcb_status == "Revoked"
    everything = [s for s in policy_mod.ALLOWABLE_TCB_STATUSES]
    decision = policy(allowed_tcb_statuses=everything, allow_debug=True).appraise(ident)
    assert decision == policy_mod.Decision(False, "TCB status Revoked is never allowed")


def test_advisories(provider, verifier):
    cert = ratls_attest.make_certificate(provider(tcb="SWHardeningNeeded"))[0]
    ident = ratls.verify_evidence(cert, verifier)
    assert "INTEL-SA-00615" in ident.advisory_ids
    allow = ["UpToDate", "SWHardeningNeeded"]
    # advisories alone never refuse
    assert policy(allowed_tcb_statuses=allow).appraise(ident).accepted
    d = policy(allowed_tcb_statuses=allow, refused_advisories=["INTEL-SA-00615"]).appraise(ident)
    assert d == policy_mod.Decision(False, "advisory INTEL-SA-00615 refused by policy")
    assert policy(allowed_tcb_statuses=allow, refused_advisories=["INTEL-SA-00999"]).appraise(ident).accepted
    d = policy(allowed_tcb_statuses=allow, accepted_advisories=["INTEL-SA-00999"]).appraise(ident)
    assert not d.accepted and "INTEL-SA-00615" in d.reason and "accepted advisories" in d.reason
    assert policy(allowed_tcb_statuses=allow, accepted_advisories=["intel-sa-00615"]).appraise(ident).accepted
    with pytest.raises(policy_mod.ReferenceValuesError, match="not both"):
        policy(refused_advisories=["A"], accepted_advisories=["B"])


def test_measurements_exact(p256, verifier):
    ident = ratls.verify_evidence(p256[0], verifier)
    assert policy(isv_prod_id=7, min_isv_svn=3).appraise(ident).accepted
    # last byte differs
    near = MR_ENCLAVE[:-1] + bytes([MR_ENCLAVE[-1] ^ 1])
    d = policy(mr_enclave=near.hex()).appraise(ident, app="2")
    assert d == policy_mod.Decision(False, f"mr_enclave {MR_ENCLAVE.hex()} not in policy for app 2")
    assert d.reason.startswith("mr_enclave 3f2a")
    d = policy(mr_signer="00" * 32).appraise(ident)
    assert not d.accepted and d.reason.startswith("mr_signer 5e5e")
    d = policy(isv_prod_id=8).appraise(ident)
    assert d == policy_mod.Decision(False, "isv_prod_id 7 is not the policy's 8")
    d = policy(min_isv_svn=4).appraise(ident)
    assert d == policy_mod.Decision(False, "isv_svn 3 below the policy's minimum 4")
    # uppercase hex is the same value; mr_signer alone is enough
    assert policy(mr_enclave=MR_ENCLAVE.hex().upper()).appraise(ident).accepted
    assert policy_mod.ReferenceValues.from_dict({"mr_signer": MR_SIGNER.hex()}).appraise(ident).accepted
    assert policy().matches_identity(ident)
    assert not policy(mr_enclave=near.hex()).matches_identity(ident)
    # min_isv_svn and debug are appraisal, not identity
    assert policy(min_isv_svn=99).matches_identity(ident)


@pytest.mark.parametrize(
    "value, needle",
    [
        (MR_ENCLAVE.hex()[:32], "64 hex characters"),  # a prefix of the enclave's value
        (MR_ENCLAVE.hex()[:2], "64 hex characters"),
        (MR_ENCLAVE.hex() + "00", "64 hex characters"),  # an extension of it
        ("", "empty"),
        (MR_ENCLAVE.hex()[:63], "odd-length"),
        (MR_ENCLAVE.hex()[:62] + "zz", "non-hex"),
        (MR_ENCLAVE.hex()[:62] + " 0", "non-hex"),
        ("0x" + MR_ENCLAVE.hex()[:62], "non-hex"),
        (42, "hex string"),
        (None, "hex string"),
        ([MR_ENCLAVE.hex()], "hex string"),
    ],
)
def test_bad_measurement_hex_is_a_load_error(value, needle):
    for name in ("mr_enclave", "mr_signer"):
        d = {"mr_enclave": MR_ENCLAVE.hex(), name: value}
        with pytest.raises(policy_mod.ReferenceValuesError, match=needle) as ei:
            policy_mod.ReferenceValues.from_dict(d, where="apps[2]")
        assert str(ei.value).startswith(f"apps[2]: {name}: ")


@pytest.mark.parametrize(
    "d, field",
    [
        ({}, "mr_enclave/mr_signer"),
        ({"allow_debug": True}, "mr_enclave/mr_signer"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "mrenclave": "x"}, "mrenclave"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "isv_prod_id": "1"}, "isv_prod_id"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "isv_prod_id": True}, "isv_prod_id"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "isv_prod_id": 70000}, "isv_prod_id"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "min_isv_svn": -1}, "min_isv_svn"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "allow_debug": "false"}, "allow_debug"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "allow_debug": 1}, "allow_debug"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "allowed_tcb_statuses": "UpToDate"}, "allowed_tcb_statuses"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "allowed_tcb_statuses": []}, "allowed_tcb_statuses"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "allowed_tcb_statuses": ["uptodate"]}, "allowed_tcb_statuses"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "refused_advisories": "INTEL-SA-00615"}, "refused_advisories"),
        ({"mr_enclave": MR_ENCLAVE.hex(), "accepted_advisories": [""]}, "accepted_advisories[0]"),
    ],
)
def test_reference_values_strict(d, field):
    with pytest.raises(policy_mod.ReferenceValuesError) as ei:
        policy_mod.ReferenceValues.from_dict(d, where="app 2")
    assert str(ei.value).startswith(f"app 2: {field}")


def test_reference_values_round_trip_and_defaults():
    rv = policy_mod.ReferenceValues.from_dict({"mr_enclave": MR_ENCLAVE.hex().upper()})
    assert rv.mr_enclave == MR_ENCLAVE and rv.mr_signer is None
    assert rv.allow_debug is False and rv.allowed_tcb_statuses == frozenset({"UpToDate"})
    assert rv.refused_advisories is None and rv.accepted_advisories is None
    full = policy(isv_prod_id=1, min_isv_svn=2, allowed_tcb_statuses=["OutOfDate", "UpToDate"],
                  refused_advisories=["INTEL-SA-00615"])
    assert policy_mod.ReferenceValues.from_dict(json.loads(json.dumps(full.to_dict()))) == full
    with pytest.raises(policy_mod.ReferenceValuesError):
        policy_mod.ReferenceValues.from_dict(["not", "a", "dict"])


# -------------------------------------------------------------------------------------------------
# The real rats-rs certificate (TCG DICE tagged evidence, real SGX hardware, debug enclave)


@pytest.fixture(scope="module")
def rats_rs(samples_dir):
    d = samples_dir / "ratls-real" / "rats-rs-demo-sgx-cert"
    expected = json.loads((d / "expected.json").read_text())
    v = dcap.Verifier(
        Collateral.from_json((d / "collateral.json").read_text()),
        root_ca=(samples_dir / "real-dcap" / "IntelSGXRootCA.der").read_bytes(),
    )
    return d, expected, v


def test_rats_rs_certificate(rats_rs):
    d, expected, v = rats_rs
    now = expected["now"]
    ident = ratls.verify_evidence((d / "cert.pem").read_bytes(), v, now=now)
    assert ident.evidence_format == "dice"
    assert ident.debug is True
    assert ident.mr_enclave.hex() == expected["mr_enclave"]
    assert ident.mr_signer.hex() == expected["mr_signer"]
    assert ident.attributes.hex() == expected["attributes"]
    assert ident.report_data.hex() == expected["report_data"]
    assert ident.cert_der == (d / "cert.der").read_bytes()
    assert ratls_attest.pubkey_hash(ident.public_key).hex().startswith("8d5e52bb")
    # same result from DER
    assert ratls.verify_evidence((d / "cert.der").read_bytes(), v, now=now).mr_enclave == ident.mr_enclave

    # appraisal: a debug enclave is refused by default ...
    in_window = ident.not_before + 30  # the certificate lived for one minute in April 2024
    rv = policy_mod.ReferenceValues.from_dict(
        {"mr_enclave": expected["mr_enclave"], "allowed_tcb_statuses": _allowable_for(ident.tcb_status)}
    )
    assert rv.appraise(ident, now=in_window) == policy_mod.Decision(False, "debug enclave refused")
    # ... accepted with allow_debug and the matching mr_enclave, while the certificate is valid ...
    rv_debug = dataclasses.replace(rv, allow_debug=True)
    assert rv_debug.appraise(ident, now=in_window) == policy_mod.Decision(True, None)
    # ... and expired at the time its collateral was valid
    assert rv_debug.appraise(ident, now=now).reason.startswith("certificate expired")


def _allowable_for(status: str) -> list[str]:
    assert status in policy_mod.ALLOWABLE_TCB_STATUSES, status
    return sorted({"UpToDate", status})


def test_rats_rs_binding_is_checked(rats_rs):
    """The real evidence moved into a certificate with another key fails on the binding."""
    d, expected, v = rats_rs
    cert = x509.load_der_x509_certificate((d / "cert.der").read_bytes())
    raw = ratls.raw_extensions(cert.tbs_certificate_bytes)
    assert [e.oid for e in raw] == [
        "2.5.29.14", "2.5.29.19", "2.5.29.15", "2.23.133.5.4.9", "2.23.133.5.4.2"
    ]
    dice = next(e.value for e in raw if e.oid == "2.23.133.5.4.9")
    key = ec.generate_private_key(ec.SECP256R1())
    now = expected["now"]
    err = evidence_error(crafted_cert(key, [extension(OID_DICE, dice)], now=now), v, now=now)
    assert err.step == "binding"
    # and after its collateral expired, the quote itself is no longer verifiable
    err = evidence_error((d / "cert.der").read_bytes(), v, now=4102444800)
    assert err.step == "quote_verification"
