"""RA-TLS making: a key pair and a self-signed X.509 certificate carrying a quote that binds the key.

Who may import it: the enclave side (asps_client) and command lines; ratls (reading) imports its
format constants.  It is copied into enclave images, so it imports only attester and dcap_quote:
making a certificate loads no verification, collateral or appraisal code.

Three shapes are made (ratls.py describes them and reads them): ``cczoo`` (extension
1.2.840.113741.1 with the raw quote, report_data[0:32] = SHA256(SPKI)), ``gramine`` (its legacy
quote extension plus TCG DICE tagged evidence, as Gramine's ra_tls_attest.c writes them) and
``dice`` (the TCG DICE tagged evidence alone, as the CCC's interoperable RA-TLS specifies it for SGX
and TDX quotes alike: what a TD's certificate carries by default).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attester import QuoteProvider, check_quote

if TYPE_CHECKING:
    from cryptography import x509

# --------------------------------------------------------------------------------------------------
# Constants (formats are public facts; names are ours)

OID_CCZOO_QUOTE = "1.2.840.113741.1"
OID_GRAMINE_QUOTE = "1.2.840.113741.1337.6"
# ra_tls.h's NON_STANDARD_INTEL_SGX_QUOTE_OID is {06 09 2A 86 48 86 F8 4D 8A 39 06}: the tag and length
# of 1.2.840.113741.1337.6 are part of the OID's content bytes, so parsers read this OID instead.
OID_GRAMINE_QUOTE_MISENCODED = "0.6.9.42.840.113741.1337.6"
OID_TCG_DICE_TAGGED_EVIDENCE = "2.23.133.5.4.9"

# TCG_DICE_TAGGED_EVIDENCE_TEE_QUOTE_CBOR_TAG (Gramine ra_tls_common.h); CCC interoperable RA-TLS's
# "Intel TEE quote, including all SGX and TDX ECDSA quote types": the quote header's tee_type tells.
CBOR_TAG_SGX_QUOTE = 60000
CBOR_TAG_INTEL_TEE_QUOTE = CBOR_TAG_SGX_QUOTE
CLAIM_PUBKEY_HASH = "pubkey-hash"
# IANA "Named Information Hash Algorithm Registry" ids, as accepted by Gramine's verifier.
IANA_HASH_SHA256 = 1
IANA_HASHES: dict[int, Callable[[bytes], Any]] = {
    1: hashlib.sha256,
    7: hashlib.sha384,
    8: hashlib.sha512,
}

FORMATS = ("cczoo", "gramine", "dice")
KEY_TYPES = ("p256", "p384", "rsa3072")
DEFAULT_KEY_TYPE = {"cczoo": "p256", "gramine": "p384", "dice": "p384"}  # Gramine generates SECP384R1 keys
DEFAULT_VALIDITY_SECONDS = 3600
MAX_VALIDITY_SECONDS = 7 * 24 * 3600  # a quote-carrying certificate is a short-lived credential
CLOCK_SKEW_SECONDS = 60  # notBefore is back-dated this much so a verifier slightly behind still accepts

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


# --------------------------------------------------------------------------------------------------
# Key and certificate helpers


def generate_key(key_type: str) -> PrivateKey:
    """A fresh private key of the named type; it never leaves the process unless the caller saves it."""
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unknown key type {key_type!r} (expected one of {', '.join(KEY_TYPES)})")


def spki_der(public_key: PublicKey) -> bytes:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return public_key.public_bytes(serialization.Encoding.DER, fmt)


def pubkey_hash(public_key: PublicKey) -> bytes:
    """SHA256 of the DER SubjectPublicKeyInfo: what report_data (or the DICE claim) carries."""
    return hashlib.sha256(spki_der(public_key)).digest()


# cbor2 loads with the first DICE evidence (formats "gramine" and "dice"), not with the module: an
# enclave making "cczoo" certificates never needs it (issue 12, cold start).


def dice_claims(public_key: PublicKey) -> bytes:
    """Serialized claims map {"pubkey-hash": bstr(serialized [1, sha256(SPKI)])}, as Gramine writes it."""
    import cbor2

    hash_entry = cbor2.dumps([IANA_HASH_SHA256, pubkey_hash(public_key)])
    return cbor2.dumps({CLAIM_PUBKEY_HASH: hash_entry})


def dice_evidence(quote: bytes, claims: bytes) -> bytes:
    """CBOR tag 60000 wrapping [quote, claims], both byte strings."""
    import cbor2

    return cbor2.dumps(cbor2.CBORTag(CBOR_TAG_SGX_QUOTE, [quote, claims]))


def _report_data(first32: bytes, extra: bytes) -> bytes:
    if len(extra) > 32:
        raise ValueError("extra_report_data is at most 32 bytes")
    return first32 + extra + bytes(32 - len(extra))


def _sign_hash(key: PrivateKey) -> hashes.HashAlgorithm:
    # Gramine signs with SHA256 whatever the curve (mbedtls_x509write_crt_set_md_alg(SHA256)).
    return hashes.SHA256()


def _subject(fmt: str) -> x509.Name:
    """The subject (and issuer: the certificates are self-signed) each original writes."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    if fmt == "gramine":  # mbedtls writes "CN=RATLS,O=GramineDevelopers,C=US" in string order
        attrs = ((NameOID.COMMON_NAME, "RATLS"), (NameOID.ORGANIZATION_NAME, "GramineDevelopers"),
                 (NameOID.COUNTRY_NAME, "US"))
    else:  # sgx_ra_tls_impl.cc adds C, O, CN in this order
        attrs = ((NameOID.COUNTRY_NAME, "CN"), (NameOID.ORGANIZATION_NAME, "Intel Inc."),
                 (NameOID.COMMON_NAME, "localhost"))
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


def cert_to_pem(cert_der: bytes) -> bytes:
    from cryptography import x509  # see make_certificate

    return x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (callers store it with mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key_pem(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("unsupported private key type")
    return key


def _get_quote(provider: QuoteProvider, report_data: bytes) -> bytes:
    """Any provider's quote (a real one checks its own; a stand-in may not) must parse and carry ours."""
    return check_quote(provider.get_quote(report_data), report_data, "provider")


def _self_named(fmt: str) -> Any:
    """The start of every format's certificate: self-issued (subject = issuer), serial 1."""
    from cryptography import x509

    return x509.CertificateBuilder().subject_name(_subject(fmt)).issuer_name(_subject(fmt)).serial_number(1)


def make_certificate(
    provider: QuoteProvider,
    *,
    key_type: str | None = None,
    fmt: str = "cczoo",
    validity_seconds: int = DEFAULT_VALIDITY_SECONDS,
    extra_report_data: bytes = b"",
    now: int | None = None,
    key: PrivateKey | None = None,
) -> tuple[bytes, PrivateKey]:
    """Make a key (unless given) and a self-signed certificate carrying a quote that binds it.

    ``key_type`` defaults to p256 for cczoo and p384 (Gramine's curve) for gramine.
    ``extra_report_data`` (<= 32 bytes) goes to report_data[32:64]; the rest stays zero.
    Returns (certificate DER, private key).
    """
    # Imported here, not at the top: cryptography.x509 is most of `import asps_client`'s cold start
    # (~50 ms), and an enclave makes one certificate per run, after its other work has started.
    from cryptography import x509

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if (
        isinstance(validity_seconds, bool)
        or not isinstance(validity_seconds, int)
        or not 0 < validity_seconds <= MAX_VALIDITY_SECONDS
    ):
        raise ValueError(f"validity_seconds must be 1..{MAX_VALIDITY_SECONDS}")
    if key is None:
        key = generate_key(key_type or DEFAULT_KEY_TYPE[fmt])
    public = key.public_key()
    issued = int(time.time()) if now is None else int(now)
    not_before = _dt.datetime.fromtimestamp(issued - CLOCK_SKEW_SECONDS, _dt.UTC)
    not_after = _dt.datetime.fromtimestamp(issued + validity_seconds, _dt.UTC)

    if fmt == "cczoo":
        quote = _get_quote(provider, _report_data(pubkey_hash(public), extra_report_data))
        builder = (
            _self_named(fmt)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_CCZOO_QUOTE), quote), False)
        )
    elif fmt == "dice":
        claims = dice_claims(public)
        quote = _get_quote(provider, _report_data(hashlib.sha256(claims).digest(), extra_report_data))
        builder = (
            _self_named(fmt)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), False)
            .add_extension(
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier(OID_TCG_DICE_TAGGED_EVIDENCE), dice_evidence(quote, claims)
                ),
                False,
            )
        )
    else:
        # Two quotes, as ra_tls_attest.c: legacy (report_data = hash(SPKI)) and DICE (= hash(claims)).
        legacy_quote = _get_quote(provider, _report_data(pubkey_hash(public), extra_report_data))
        claims = dice_claims(public)
        dice_quote = _get_quote(provider, _report_data(hashlib.sha256(claims).digest(), extra_report_data))
        builder = (
            _self_named(fmt)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), False)
            .add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_GRAMINE_QUOTE_MISENCODED), legacy_quote),
                False,
            )
            .add_extension(
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier(OID_TCG_DICE_TAGGED_EVIDENCE), dice_evidence(dice_quote, claims)
                ),
                False,
            )
        )
    builder = builder.public_key(public).not_valid_before(not_before).not_valid_after(not_after)
    cert = builder.sign(key, _sign_hash(key))
    return cert.public_bytes(serialization.Encoding.DER), key
