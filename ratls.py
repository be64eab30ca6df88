"""RA-TLS reading: certificates carrying SGX or TDX DCAP quotes, and their verification to an Identity.

Who may import it: the tenant side (asps_server) and command lines; never the enclave side,
which makes certificates with ratls_attest and needs none of this.  Appraisal (is this the app's
enclave or TD?) is policy's: only the `verify` command imports policy, inside its functions.
It verifies through any QuoteVerifier (dcap.Verifier is one) and knows certificates, not collateral.

Three certificate shapes are read (the first two are made by ratls_attest):

* ``cczoo``: confidential-computing-zoo gRPC RA-TLS. Extension 1.2.840.113741.1 holds the raw quote;
  report_data[0:32] = SHA256(DER SubjectPublicKeyInfo).
* ``gramine``: what Gramine's ``tools/sgx/ra-tls/ra_tls_attest.c`` writes. Two extensions, each with
  its own quote of the same enclave:
  - the legacy one, whose OID bytes (``ra_tls.h``) wrongly include the ASN.1 tag and length, so it
    reads 0.6.9.42.840.113741.1337.6 (the intended 1.2.840.113741.1337.6 is accepted too); its quote
    has report_data[0:32] = SHA256(SPKI);
  - TCG DICE tagged evidence 2.23.133.5.4.9: CBOR tag 60000 around [quote bstr, claims bstr], the
    claims being a CBOR map {"pubkey-hash": bstr(CBOR [hash-alg-id, hash(SPKI)])}; that quote has
    report_data[0:32] = SHA256(claims bytes).
* DICE only (e.g. rats-rs, and ``dice`` made by ratls_attest): the second extension above on its own.
* ``dstack`` (read only): dstack's TDX RA-TLS certificate, signed by the app's CA rather than by
  itself. Extension 1.3.6.1.4.1.62397.1.1 holds a DER OCTET STRING wrapping the quote;
  report_data = SHA512("ratls-cert:" || SPKI DER), all 64 bytes (Dstack-TEE/dstack ra-tls/src/
  oids.rs, cert.rs, attestation.rs).  The event log (…62397.1.2) is not needed: RTMRs are pinned.

Verification establishes genuineness only (the quote is valid, and it binds this certificate's own
key); whether the enclave or TD is wanted, and whether the certificate is within its dates, is
appraisal against policy's ``ReferenceValues`` / ``TdReferenceValues``.

A TD's quote travels in any of these shapes (TCG DICE tagged evidence, ``dice``, is what a TD's
client makes: CBOR tag 60000 is the CCC interoperable RA-TLS "Intel TEE quote", SGX and TDX alike);
its Identity has tee "tdx" and the TD report's fields.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

import dcap
import dcap_quote
from ratls_attest import (
    CBOR_TAG_SGX_QUOTE,
    CLAIM_PUBKEY_HASH,
    DEFAULT_VALIDITY_SECONDS,
    FORMATS,
    IANA_HASHES,
    KEY_TYPES,
    OID_CCZOO_QUOTE,
    OID_GRAMINE_QUOTE,
    OID_GRAMINE_QUOTE_MISENCODED,
    OID_TCG_DICE_TAGGED_EVIDENCE,
    PublicKey,
    cert_to_pem,
    key_to_pem,
    make_certificate,
    pubkey_hash,
    spki_der,
)

# --------------------------------------------------------------------------------------------------
# Constants (the certificate formats' are ratls_attest's)

TCB_UP_TO_DATE = "UpToDate"


class EvidenceError(Exception):
    """Evidence malformed or not genuine. ``step`` names the failing check."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


class QuoteVerifier(Protocol):
    """The seam between RA-TLS and quote verification (dcap.Verifier implements it).

    `verify` returns the verified quote when it is genuine at `now`, and raises
    dcap.VerificationError (not genuine) or another dcap.DcapError (malformed quote, collateral
    unusable or unavailable) otherwise; verify_evidence turns either into EvidenceError.
    """

    def verify(self, quote: bytes, *, now: int | None = None) -> dcap.VerifiedQuote: ...


# --------------------------------------------------------------------------------------------------
# Extensions exactly as written (dcap's strict DER reader): duplicates and odd OIDs that x509
# libraries refuse or normalise must be seen, not hidden.


@dataclass(frozen=True)
class RawExtension:
    """One extension as it appears in the TBSCertificate (OID as decoded from its content bytes)."""

    oid: str
    critical: bool
    value: bytes


def raw_extensions(tbs: bytes) -> list[RawExtension]:
    """List the extensions of a DER TBSCertificate in order, duplicates included."""
    tag, cs, ce = dcap.der_tlv(tbs, 0, len(tbs))
    if tag != 0x30 or ce != len(tbs):
        raise ValueError("TBSCertificate is not one SEQUENCE")
    exts: list[RawExtension] = []
    for tag, fs, fe in dcap.der_children(tbs, cs, ce):
        if tag != 0xA3:  # [3] EXPLICIT Extensions
            continue
        seq = dcap.der_children(tbs, fs, fe)
        if len(seq) != 1 or seq[0][0] != 0x30:
            raise ValueError("extensions field is not one SEQUENCE")
        for etag, es, ee in dcap.der_children(tbs, seq[0][1], seq[0][2]):
            if etag != 0x30:
                raise ValueError("extension is not a SEQUENCE")
            parts = dcap.der_children(tbs, es, ee)
            if len(parts) not in (2, 3) or parts[0][0] != 0x06 or parts[-1][0] != 0x04:
                raise ValueError("extension is not {OID, [critical], OCTET STRING}")
            critical = False
            if len(parts) == 3:
                if parts[1][0] != 0x01 or parts[1][2] - parts[1][1] != 1:
                    raise ValueError("extension criticality is not a BOOLEAN")
                critical = tbs[parts[1][1]] != 0
            oid = dcap.oid_dotted(tbs[parts[0][1] : parts[0][2]])
            exts.append(RawExtension(oid, critical, tbs[parts[-1][1] : parts[-1][2]]))
    return exts


# --------------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class Identity:
    """What a genuine certificate proves about its enclave, plus the key it is bound to."""

    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    attributes: bytes
    tcb_status: str
    advisory_ids: tuple[str, ...]
    collateral_expiry: int
    public_key: PublicKey
    cert_der: bytes
    not_before: int
    not_after: int
    evidence_format: str
    report_data: bytes = b""
    fmspc: bytes = b""
    # "sgx" or "tdx".  A TD has no mr_enclave/mr_signer (empty) and no isv_* (0); its identity is
    # the TD report's measurements below (all empty for an enclave), and debug is TUD.DEBUG.
    tee: str = "sgx"
    mr_td: bytes = b""
    mr_config_id: bytes = b""
    mr_owner: bytes = b""
    mr_owner_config: bytes = b""
    rtmrs: tuple[bytes, ...] = ()
    xfam: bytes = b""
    td_attributes: bytes = b""
    tee_tcb_svn: bytes = b""
    mr_seam: bytes = b""
    tdx_module_status: str = ""

    def to_dict(self) -> dict[str, Any]:
        if self.tee == "tdx":
            return {
                "tee": self.tee,
                "mr_td": self.mr_td.hex(),
                "mr_config_id": self.mr_config_id.hex(),
                "mr_owner": self.mr_owner.hex(),
                "mr_owner_config": self.mr_owner_config.hex(),
                **{f"rtmr{i}": r.hex() for i, r in enumerate(self.rtmrs)},
                "xfam": self.xfam.hex(),
                "td_attributes": self.td_attributes.hex(),
                "tee_tcb_svn": self.tee_tcb_svn.hex(),
                "mr_seam": self.mr_seam.hex(),
                "debug": self.debug,
                "tcb_status": self.tcb_status,
                "tdx_module_status": self.tdx_module_status,
                "advisory_ids": list(self.advisory_ids),
                "collateral_expiry": self.collateral_expiry,
                "not_before": self.not_before,
                "not_after": self.not_after,
                "evidence_format": self.evidence_format,
                "public_key_sha256": pubkey_hash(self.public_key).hex(),
            }
        return {
            "mr_enclave": self.mr_enclave.hex(),
            "mr_signer": self.mr_signer.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "debug": self.debug,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "attributes": self.attributes.hex(),
            "collateral_expiry": self.collateral_expiry,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "evidence_format": self.evidence_format,
            "public_key_sha256": pubkey_hash(self.public_key).hex(),
        }


@dataclass(frozen=True)
class _Evidence:
    """One quote found in the certificate, and how it is meant to bind the key."""

    source: str  # "cczoo" | "gramine-legacy" | "dice" | "dstack"
    quote: bytes
    claims: bytes | None = None  # serialized claims map (DICE only)


# dstack (github.com/Dstack-TEE/dstack, ra-tls/src/oids.rs PHALA_RATLS_QUOTE): the extension's value is
# a DER OCTET STRING wrapping the raw quote (cert.rs), and report_data = SHA512("ratls-cert:" || SPKI DER)
# (attestation.rs QuoteContentType::RaTlsCert).  Read only: ASPS never makes this shape.
OID_DSTACK_QUOTE = "1.3.6.1.4.1.62397.1.1"
DSTACK_REPORT_DATA_TAG = b"ratls-cert:"

_QUOTE_OIDS = {
    OID_DSTACK_QUOTE: "dstack",
    OID_CCZOO_QUOTE: "cczoo",
    OID_GRAMINE_QUOTE: "gramine-legacy",
    OID_GRAMINE_QUOTE_MISENCODED: "gramine-legacy",
    OID_TCG_DICE_TAGGED_EVIDENCE: "dice",
}


def _load_certificate(cert: bytes | str) -> tuple[bytes, x509.Certificate]:
    try:
        data = cert.encode() if isinstance(cert, str) else bytes(cert)
        if data.lstrip().startswith(b"-----BEGIN"):
            parsed = x509.load_pem_x509_certificate(data)
            return parsed.public_bytes(serialization.Encoding.DER), parsed
        return data, x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as e:  # InvalidVersion is not a ValueError
        raise EvidenceError("certificate", f"not an X.509 certificate: {e}") from e


def _check_public_key(cert: x509.Certificate) -> PublicKey:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise EvidenceError("certificate", f"unusable public key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise EvidenceError("certificate", f"unsupported public key type {type(key).__name__}")
    if isinstance(key, rsa.RSAPublicKey):
        # A huge exponent makes every signature check slow: bound it before any RSA operation.
        e = key.public_numbers().e
        if e % 2 == 0 or not 3 <= e <= MAX_RSA_EXPONENT:
            raise EvidenceError(
                "certificate", f"RSA public exponent must be odd and 3..2**32 (it has {e.bit_length()} bits)"
            )
    return key


MAX_RSA_EXPONENT = 2**32


def _check_self_signature(cert: x509.Certificate, key: PublicKey) -> None:
    """The certificate is signed by its own key: nobody swapped the key or fields after signing."""
    try:
        algo = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm) as e:  # an OID cryptography does not know
        raise EvidenceError("certificate_signature", f"unsupported signature algorithm: {e}") from e
    if algo is None:
        raise EvidenceError("certificate_signature", "signature algorithm without a hash is not supported")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algo))
        else:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algo)
    except InvalidSignature as e:
        raise EvidenceError("certificate_signature", "not signed by the certificate's own key") from e
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise EvidenceError("certificate_signature", f"cannot check the signature: {e}") from e


def _find_evidence(cert: x509.Certificate) -> list[tuple[str, bytes]]:
    """The quote-carrying extensions; exactly one, or Gramine's legacy + DICE pair."""
    try:
        exts = raw_extensions(cert.tbs_certificate_bytes)
    except ValueError as e:
        raise EvidenceError("evidence_extension", f"cannot read the extensions: {e}") from e
    found = [(e.oid, e.value) for e in exts if e.oid in _QUOTE_OIDS]
    if not found:
        raise EvidenceError(
            "evidence_extension",
            "no RA-TLS evidence extension (expected OID "
            f"{OID_CCZOO_QUOTE}, {OID_GRAMINE_QUOTE}, {OID_TCG_DICE_TAGGED_EVIDENCE} or "
            f"{OID_DSTACK_QUOTE})",
        )
    oids = [oid for oid, _ in found]
    dup = sorted({oid for oid in oids if oids.count(oid) > 1})
    if dup:
        raise EvidenceError("evidence_extension", f"evidence extension {dup[0]} appears more than once")
    kinds = sorted(_QUOTE_OIDS[oid] for oid in oids)
    if len(kinds) > 1 and kinds != ["dice", "gramine-legacy"]:
        raise EvidenceError(
            "evidence_extension",
            f"more than one quote ({', '.join(oids)}); only Gramine's legacy + DICE pair may carry two",
        )
    return [(_QUOTE_OIDS[oid], value) for oid, value in found]


def _decode_cbor(data: bytes, what: str) -> Any:
    """Decode exactly one definite-length CBOR item with no trailing bytes and no duplicate keys."""
    fp = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(fp, allow_indefinite=False, allow_duplicate_keys=False, read_size=1).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as e:
        raise EvidenceError("dice_evidence", f"{what} is not valid CBOR: {e}") from e
    if fp.tell() != len(data):
        raise EvidenceError("dice_evidence", f"{what} has {len(data) - fp.tell()} trailing bytes")
    return item


def _parse_dice(value: bytes) -> _Evidence:
    """CBOR tag 60000 [quote bstr, claims bstr]; the claims must carry a usable pubkey-hash."""
    item = _decode_cbor(value, "tagged evidence")
    if not isinstance(item, cbor2.CBORTag) or item.tag != CBOR_TAG_SGX_QUOTE:
        raise EvidenceError("dice_evidence", f"tagged evidence is not CBOR tag {CBOR_TAG_SGX_QUOTE}")
    body = item.value
    if not isinstance(body, list | tuple) or len(body) != 2:
        raise EvidenceError("dice_evidence", "tagged evidence is not a 2-element array [quote, claims]")
    quote, claims = body
    if not isinstance(quote, bytes) or not quote:
        raise EvidenceError("dice_evidence", "quote element is not a non-empty byte string")
    if not isinstance(claims, bytes) or not claims:
        raise EvidenceError("dice_evidence", "claims element is not a non-empty byte string")
    return _Evidence("dice", quote, claims)


def _parse_dstack(value: bytes) -> _Evidence:
    """dstack's quote extension: exactly one DER OCTET STRING holding the quote."""
    try:
        tag, start, end = dcap.der_tlv(value, 0, len(value))
    except ValueError as e:
        raise EvidenceError("dstack_evidence", f"quote extension is not DER: {e}") from e
    if tag != 0x04 or end != len(value) or end == start:
        raise EvidenceError("dstack_evidence", "quote extension is not one non-empty OCTET STRING")
    return _Evidence("dstack", value[start:end])


def dstack_report_data(spki: bytes) -> bytes:
    """What a dstack RA-TLS quote's report_data must be for a certificate key: all 64 bytes."""
    return hashlib.sha512(DSTACK_REPORT_DATA_TAG + spki).digest()


def _issued_by_another(cert: x509.Certificate) -> bool:
    """A dstack RA-TLS certificate is signed by its app's CA, not by itself: its key is bound by the
    quote (report_data), so only such a certificate is read without a self-signature."""
    try:
        oids = {e.oid for e in raw_extensions(cert.tbs_certificate_bytes)}
    except ValueError:
        return False
    return OID_DSTACK_QUOTE in oids and cert.issuer != cert.subject


def _claimed_key_hash(claims: bytes, spki: bytes) -> None:
    """The claims map's pubkey-hash is the hash of this certificate's SPKI."""
    claim_map = _decode_cbor(claims, "claims")
    if not isinstance(claim_map, dict) or not claim_map:
        raise EvidenceError("dice_evidence", "claims is not a non-empty CBOR map")
    if any(not isinstance(k, str) or not k for k in claim_map):
        raise EvidenceError("dice_evidence", "claims map keys must be non-empty text strings")
    if CLAIM_PUBKEY_HASH not in claim_map:
        raise EvidenceError("dice_evidence", f'claims carry no "{CLAIM_PUBKEY_HASH}"')
    entry_bytes = claim_map[CLAIM_PUBKEY_HASH]
    if not isinstance(entry_bytes, bytes) or not entry_bytes:
        raise EvidenceError("dice_evidence", f'"{CLAIM_PUBKEY_HASH}" is not a byte string (serialized entry)')
    entry = _decode_cbor(entry_bytes, CLAIM_PUBKEY_HASH)
    if not isinstance(entry, list | tuple) or len(entry) != 2:
        raise EvidenceError("dice_evidence", f'"{CLAIM_PUBKEY_HASH}" is not [hash-alg-id, hash]')
    alg, digest = entry
    if isinstance(alg, bool) or not isinstance(alg, int) or alg not in IANA_HASHES:
        # never repr() a decoded bignum: past 4300 digits int -> str itself raises ValueError
        shown = repr(alg) if isinstance(alg, int) and abs(alg) < 1 << 64 else type(alg).__name__
        raise EvidenceError("dice_evidence", f"unsupported hash-alg-id {shown} (expected 1, 7 or 8)")
    expected = IANA_HASHES[alg](spki).digest()
    if not isinstance(digest, bytes) or len(digest) != len(expected):
        raise EvidenceError("dice_evidence", f"pubkey-hash value is not a {len(expected)}-byte string")
    if digest != expected:
        raise EvidenceError("binding", "DICE claims carry the hash of another public key")


def _check_binding(ev: _Evidence, quote: dcap_quote.Quote, spki: bytes) -> None:
    """report_data[0:32] commits to this certificate's key (directly, or via the DICE claims)."""
    rd = quote.report.report_data
    if ev.source == "dstack":
        if rd != dstack_report_data(spki):
            why = 'dstack quote\'s report_data is not SHA512("ratls-cert:" || this certificate\'s key)'
            raise EvidenceError("binding", why)
        return
    if ev.claims is None:
        if rd[:32] != hashlib.sha256(spki).digest():
            raise EvidenceError(
                "binding", f"{ev.source} quote's report_data is not SHA256 of this certificate's public key"
            )
        return
    if rd[:32] != hashlib.sha256(ev.claims).digest():
        raise EvidenceError("binding", "DICE quote's report_data is not SHA256 of the claims packed with it")
    _claimed_key_hash(ev.claims, spki)


def _same_enclave(a: dcap_quote.Quote, b: dcap_quote.Quote) -> None:
    """Gramine's two quotes must come from one enclave on one platform; only report_data may differ."""
    if a.header != b.header:
        raise EvidenceError("gramine_consistency", "legacy and DICE quotes have different headers")
    blank = bytes(64)
    if replace(a.report, report_data=blank) != replace(b.report, report_data=blank):
        raise EvidenceError("gramine_consistency", "legacy and DICE quotes describe different enclaves")
    if a.signature.attestation_key != b.signature.attestation_key:
        raise EvidenceError("gramine_consistency", "legacy and DICE quotes have different attestation keys")


def _verify_quote(verifier: QuoteVerifier, quote: bytes, now: int | None,
                  source: str) -> dcap.VerifiedQuote:
    try:
        return verifier.verify(quote, now=now)
    except dcap.VerificationError as e:
        raise EvidenceError("quote_verification", f"{source} quote not genuine ({e.check}): {e}") from e
    except dcap.DcapError as e:
        raise EvidenceError("quote_verification", f"{source} quote: {type(e).__name__}: {e}") from e


def _timestamp(d: _dt.datetime) -> int:
    return int(d.timestamp())


def verify_evidence(cert: bytes | str, verifier: QuoteVerifier, *, now: int | None = None) -> Identity:
    """Check that the certificate carries a genuine quote binding its own key; return the identity.

    The certificate's validity dates are not checked here (see policy's ``ReferenceValues.appraise``).
    Every failure raises EvidenceError naming its step.
    """
    der, parsed = _load_certificate(cert)
    key = _check_public_key(parsed)
    spki = spki_der(key)
    if not _issued_by_another(parsed):
        _check_self_signature(parsed, key)
    found = _find_evidence(parsed)

    evidence: list[_Evidence] = []
    for source, value in found:
        if source == "dice":
            evidence.append(_parse_dice(value))
        elif source == "dstack":
            evidence.append(_parse_dstack(value))
        else:
            evidence.append(_Evidence(source, value))
    quotes: list[dcap_quote.Quote] = []
    for ev in evidence:
        try:
            quotes.append(dcap_quote.parse_quote(ev.quote))
        except dcap_quote.QuoteError as e:
            raise EvidenceError("quote_parse", f"{ev.source} quote: {e}") from e
    for ev, q in zip(evidence, quotes, strict=True):
        _check_binding(ev, q, spki)
    if len(quotes) == 2:
        _same_enclave(quotes[0], quotes[1])

    # Verify every quote: each one is a claim about this key, so each must be genuine.
    results = [_verify_quote(verifier, ev.quote, now, ev.source) for ev in evidence]
    main = next((r for ev, r in zip(evidence, results, strict=True) if ev.source == "dice"), results[0])
    if len(results) == 2 and (results[0].status, results[0].advisory_ids) != (
        results[1].status,
        results[1].advisory_ids,
    ):
        raise EvidenceError("gramine_consistency", "legacy and DICE quotes verify to different TCB results")

    sources = sorted(ev.source for ev in evidence)
    fmt = "gramine" if sources == ["dice", "gramine-legacy"] else sources[0]
    return Identity(
        mr_enclave=bytes(main.mr_enclave),
        mr_signer=bytes(main.mr_signer),
        isv_prod_id=int(main.isv_prod_id),
        isv_svn=int(main.isv_svn),
        debug=bool(main.debug),
        attributes=bytes(main.attributes),
        tcb_status=str(main.status),
        advisory_ids=tuple(main.advisory_ids),
        collateral_expiry=min(int(r.collateral_expiry) for r in results),
        public_key=key,
        cert_der=der,
        not_before=_timestamp(parsed.not_valid_before_utc),
        not_after=_timestamp(parsed.not_valid_after_utc),
        evidence_format=fmt,
        report_data=bytes(main.report_data),
        fmspc=bytes(getattr(main, "fmspc", b"")),
        **_td_fields(main),
    )


def _td_fields(verified: dcap.VerifiedQuote) -> dict[str, Any]:
    """The Identity fields of a TD (tee "tdx" and its TD report); nothing for an enclave."""
    td = getattr(verified, "td_report", None)
    if td is None:
        return {}
    return {
        "tee": "tdx",
        "mr_td": bytes(td.mr_td),
        "mr_config_id": bytes(td.mr_config_id),
        "mr_owner": bytes(td.mr_owner),
        "mr_owner_config": bytes(td.mr_owner_config),
        "rtmrs": tuple(bytes(r) for r in td.rtmrs),
        "xfam": bytes(td.xfam),
        "td_attributes": bytes(td.td_attributes),
        "tee_tcb_svn": bytes(td.tee_tcb_svn),
        "mr_seam": bytes(td.mr_seam),
        "tdx_module_status": str(getattr(verified, "tdx_module_status", "")),
    }


# --------------------------------------------------------------------------------------------------
# Command line


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _hex32(value: str) -> bytes:
    import policy  # appraisal's parser: the command line's only, loaded when it runs

    try:
        return policy.parse_hex(value, "value")
    except policy.ReferenceValuesError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("value: ")) from None


_SIM_DEFAULTS: dict[str, Any] = {
    "sim_dir": None,
    "mr_enclave": None,
    "mr_signer": None,
    "isv_prod_id": 0,
    "isv_svn": 0,
    "debug": False,
    "tcb": TCB_UP_TO_DATE,
}
_SIM_OPTIONS = tuple(_SIM_DEFAULTS)


def _cmd_make(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    sim_only = [f"--{n.replace('_', '-')}" for n in _SIM_OPTIONS if getattr(args, n) != _SIM_DEFAULTS[n]]
    if args.provider != "sim" and sim_only:
        print(f"error: {', '.join(sim_only)}: only with --provider sim", file=sys.stderr)
        return 2
    if args.provider == "sim":
        if not args.sim_dir:
            print("error: --sim-dir is required with --provider sim", file=sys.stderr)
            return 2
        options = {
            "sim_dir": args.sim_dir,
            "isv_prod_id": args.isv_prod_id,
            "isv_svn": args.isv_svn,
            "debug": args.debug,
            "tcb": args.tcb,
        }
        if args.mr_enclave is not None:
            options["mr_enclave"] = args.mr_enclave
        if args.mr_signer is not None:
            options["mr_signer"] = args.mr_signer
    import attester  # the CLI's `make` is the enclave side's job: loaded only for it

    try:
        provider = attester.get_provider(args.provider, **options)
        cert_der, key = make_certificate(
            provider, key_type=args.key_type, fmt=args.format, validity_seconds=args.validity
        )
    except (dcap.DcapError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _write_private(args.key, key_to_pem(key))
    with open(args.cert, "wb") as f:
        f.write(cert_to_pem(cert_der))
    print(f"wrote {args.cert} ({args.format}) and {args.key}", file=sys.stderr)
    return 0


def _reference_values_from_args(args: argparse.Namespace) -> Any:
    import policy  # policy decides; ratls only reads certificates (see the module docstring)

    if args.mr_td is not None:
        return _td_reference_values_from_args(args)
    if args.rtmr:
        raise policy.ReferenceValuesError("--rtmr: only with --mr-td (a TD's reference values)")
    if args.mr_enclave is None and args.mr_signer is None:
        return None
    d: dict[str, Any] = {"allow_debug": args.allow_debug}
    if args.mr_enclave is not None:
        d["mr_enclave"] = args.mr_enclave
    if args.mr_signer is not None:
        d["mr_signer"] = args.mr_signer
    if args.isv_prod_id is not None:
        d["isv_prod_id"] = args.isv_prod_id
    if args.min_isv_svn is not None:
        d["min_isv_svn"] = args.min_isv_svn
    _add_tcb_args(d, args)
    return policy.ReferenceValues.from_dict(d)


def _td_reference_values_from_args(args: argparse.Namespace) -> Any:
    import policy

    for flag in ("mr_enclave", "mr_signer", "isv_prod_id", "min_isv_svn"):
        if getattr(args, flag) is not None:
            raise policy.ReferenceValuesError(f"--{flag.replace('_', '-')}: an enclave's, not with --mr-td")
    d: dict[str, Any] = {"mr_td": args.mr_td, "allow_debug": args.allow_debug}
    for spec in args.rtmr:
        index, _, value = spec.partition("=")
        if index not in ("0", "1", "2", "3"):
            raise policy.ReferenceValuesError(f"--rtmr: give N=HEX with N 0..3, not {spec[:8]!r}")
        d[f"rtmr{index}"] = value
    _add_tcb_args(d, args)
    return policy.TdReferenceValues.from_dict(d)


def _add_tcb_args(d: dict[str, Any], args: argparse.Namespace) -> None:
    """The TCB-status and advisory flags, the same for an enclave's and a TD's reference values."""
    if args.allow_tcb:
        d["allowed_tcb_statuses"] = sorted({TCB_UP_TO_DATE, *args.allow_tcb})
    if args.refuse_advisory:
        d["refused_advisories"] = args.refuse_advisory
    if args.accept_advisory:
        d["accepted_advisories"] = args.accept_advisory


def _cmd_verify(args: argparse.Namespace) -> int:
    import policy as policy_mod  # appraisal: loaded by the command line only

    Decision = policy_mod.Decision
    try:
        policy = _reference_values_from_args(args)
    except policy_mod.ReferenceValuesError as e:
        print(f"error: reference values: {e}", file=sys.stderr)
        return 2
    try:
        with open(args.cert, "rb") as f:
            cert = f.read()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    now = args.now
    identity: Identity | None = None
    import pccs  # collateral sources: loaded only for the CLI's `verify`

    try:
        source = pccs.open_collateral_source(args.collateral, args.pccs)
        root = dcap.load_root_ca(args.root_ca)
        verifier = dcap.Verifier(source, root_ca=root)
        identity = verify_evidence(cert, verifier, now=now)
    except EvidenceError as e:
        decision = Decision(False, f"evidence not genuine: {e}")
    except dcap.DcapError as e:  # collateral / root problems before any evidence was looked at
        decision = Decision(False, f"cannot verify: {type(e).__name__}: {e}")
    else:
        if policy is None:
            decision = Decision(False, "no policy given (pass --mr-enclave and/or --mr-signer, or --mr-td)")
        else:
            decision = policy.appraise(identity, now=now)
    if args.json:
        out = {
            "accepted": decision.accepted,
            "reason": decision.reason,
            "identity": identity.to_dict() if identity is not None else None,
        }
        print(json.dumps(out, indent=2))
    else:
        if identity is not None:
            for k, v in identity.to_dict().items():
                print(f"{k}: {v}")
        print("ACCEPTED" if decision.accepted else f"REFUSED: {decision.reason}")
    return 0 if decision.accepted else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratls.py", description="Make and verify RA-TLS certificates.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make", help="make a key and a quote-carrying self-signed certificate")
    m.add_argument("--provider", choices=("sim", "occlum", "gramine", "tdx"), required=True)
    m.add_argument("--sim-dir", help="simulated platform directory (sim provider)")
    m.add_argument("--format", choices=FORMATS, default="cczoo")
    m.add_argument("--key-type", choices=KEY_TYPES, help="default: p256 (cczoo), p384 (gramine)")
    m.add_argument("--validity", type=int, default=DEFAULT_VALIDITY_SECONDS, help="seconds (default 3600)")
    m.add_argument("--cert", required=True, help="output certificate (PEM)")
    m.add_argument("--key", required=True, help="output private key (PEM, mode 0600)")
    g = m.add_argument_group("sim provider: enclave identity and platform TCB")
    g.add_argument("--mr-enclave", type=_hex32)
    g.add_argument("--mr-signer", type=_hex32)
    g.add_argument("--isv-prod-id", type=int, default=0)
    g.add_argument("--isv-svn", type=int, default=0)
    g.add_argument("--debug", action="store_true", help="debug enclave")
    g.add_argument("--tcb", default=TCB_UP_TO_DATE, help="platform TCB level (default UpToDate)")
    m.set_defaults(func=_cmd_make)

    v = sub.add_parser("verify", help="verify a certificate and appraise it against reference values")
    v.add_argument("cert", help="certificate (PEM or DER)")
    v.add_argument("--collateral", help="collateral JSON file")
    v.add_argument("--pccs", help="PCCS/PCS base URL")
    v.add_argument("--root-ca", help="trusted root CA (default: Intel SGX Root CA shipped with ASPS)")
    v.add_argument("--mr-enclave", help="expected MRENCLAVE (64 hex)")
    v.add_argument("--mr-signer", help="expected MRSIGNER (64 hex)")
    v.add_argument("--mr-td", help="expected MRTD of a TD (96 hex); TD reference values instead")
    v.add_argument("--rtmr", action="append", default=[], metavar="N=HEX",
                   help="expected RTMR N (with --mr-td)")
    v.add_argument("--isv-prod-id", type=int)
    v.add_argument("--min-isv-svn", type=int)
    v.add_argument("--allow-debug", action="store_true")
    v.add_argument("--allow-tcb", nargs="+", action="extend", default=[], metavar="STATUS")
    v.add_argument("--refuse-advisory", nargs="+", action="extend", default=[], metavar="ID")
    v.add_argument("--accept-advisory", nargs="+", action="extend", default=[], metavar="ID")
    v.add_argument("--now", type=int, help="evaluate at this UNIX time")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_cmd_verify)
    return p


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args.command == "verify" and bool(args.collateral) == bool(args.pccs):
        print("error: give exactly one of --collateral FILE or --pccs URL", file=sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
