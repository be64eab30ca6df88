"""SGX and TDX DCAP quote verification against Intel collateral, in pure Python: is this quote genuine,
and what is the platform's TCB status?

Who may import it: the tenant side (ratls, asps_server, pccs, native_qvl, command lines) and tests.
Never the enclave side.  It verifies; the quote format is dcap_quote's, the collateral bundle
dcap_collateral's, and where collateral comes from is the caller's (a Collateral, or any
CollateralSource such as pccs's): this module imports no project module but those two.

It answers the way Intel's Quote Verification Library (QVL) does, step by step, each step a small
named check that fails with its own reason.  Sections (in file order): errors and constants .
DER / X.509 helpers . trusted root . PCK certificate (SGX extension) . CRLs . TCB info and QE
identity (SGX and TDX: tdxModule, tdxModuleIdentities) . TCB status merge . verify (the steps,
VerifiedQuote, Verifier and its caches) . TDX (module identity, TCB level, relaunch, convergence).

Library API: verify(quote, collateral, root_ca=, now=), Verifier(source, root_ca=).verify(quote,
now=), CollateralSource, load_root_ca / is_intel_root, parse_tcb_info, parse_qe_identity,
parse_sgx_extension, collateral_next_update.  CLI: `python dcap.py sim-init | quote | verify`
(dcap_cli).

What is cached (Verifier, and a bounded process-wide cache behind verify()): every collateral piece
and every PCK chain, keyed by its exact bytes and the trusted root, once its signatures verified.
Time windows and revocation are re-checked on every call against `now`; the ISV signature of each
quote is always verified.

Malformed quote bytes raise QuoteError (and nothing else), malformed collateral CollateralError, a
quote or collateral that is not genuine at `now` VerificationError(check=...); all are DcapError.
A genuine quote whose platform is Revoked, or a debug enclave, is a *result*: the appraisal
(ratls/policy) refuses it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import operator
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import ExtensionOID, NameOID

from dcap_collateral import Collateral, CollateralError, CollateralUnavailable
from dcap_collateral import crl_der as _crl_bytes
from dcap_collateral import iso_date as _iso
from dcap_collateral import parse_json as _parse_json
from dcap_collateral import unix_now as _now
from dcap_collateral import utf8 as _utf8
from dcap_quote import (
    CERT_PCK_CHAIN,
    ECDSA_KEY_LEN,
    ECDSA_SIG_LEN,
    INTEL_QE_VENDOR_ID,
    REPORT_BODY_LEN,
    SGX_QUOTE_V4,
    TEE_TDX,
    CertificationData,
    DcapError,
    Quote,
    ReportBody,
    TdReport,
    parse_quote,
)

_log = logging.getLogger("dcap")
_log.addHandler(logging.NullHandler())  # a library: the application decides where warnings go

# ---------------------------------------------------------------------------------------------------
# errors and constants
# ---------------------------------------------------------------------------------------------------

# DcapError (the base) comes from dcap_quote (so does QuoteError, for malformed quotes), CollateralError
# and CollateralUnavailable from dcap_collateral; this module raises those three too, so callers may
# catch them as dcap.<name>.


class VerificationError(DcapError):
    """The quote is not genuine, or the collateral is not valid at `now`.

    `.check` names the failing step (e.g. "pck_chain", "tcb_info_signature") so callers and tests can
    tell refusals apart without parsing messages.
    """

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.reason = message


# Combined statuses, best first.
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
# A TD's combined status may also advise relaunching the TD (Intel QVL TDRelaunchCheck: the platform
# was updated while the TD ran, and a relaunched TD would be up to date).
TD_RELAUNCH_STATUSES = ("TDRelaunchAdvised", "TDRelaunchAdvisedConfigurationNeeded")
# A CollateralSource is asked for a TD's collateral (TDX TCB info, TD QE identity) with the PCK CA
# type prefixed by this ("tdx-processor", "tdx-platform"): the same (FMSPC, type) key, cache and
# back-off as SGX collateral, without changing the Protocol.
TDX_CA_PREFIX = "tdx-"

# ---------------------------------------------------------------------------------------------------
# small helpers: time, DER, X.509 certificates
# ---------------------------------------------------------------------------------------------------

_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)

# What `cryptography` raises on malformed X.509 input (certificates, CRLs, names, extensions).  Not
# all of it is a ValueError: a version field other than v1/v3 (v1/v2 for CRLs) raises InvalidVersion,
# a repeated extension DuplicateExtension, an unknown GeneralName UnsupportedGeneralNameType, an
# unknown algorithm UnsupportedAlgorithm.  Every place that parses untrusted X.509 catches this tuple.
_X509_ERRORS: tuple[type[Exception], ...] = (
    ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def _parse_date(value: object, name: str) -> int:
    """RFC 3339 date of TCB info / QE identity ("2025-06-19T10:56:11Z") -> unix seconds."""
    if not isinstance(value, str):
        raise CollateralError(f"{name}: must be a date string")
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise CollateralError(f"{name}: not an RFC 3339 date: {value[:40]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def _ecdsa_der(sig: bytes) -> bytes:
    """Raw r||s (64 bytes, as Intel writes signatures) -> DER for `cryptography`."""
    return encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))


def der_tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """One DER element at `pos`: (tag, content_start, content_end); ValueError if malformed.

    Strict (single-byte tags, minimal lengths): shared by the PCK extension reader here and by
    ratls, which lists certificate extensions exactly as written.
    """
    if pos + 2 > end:
        raise ValueError("truncated DER element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not expected here")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        if length < 0x80 or data[pos] == 0:
            raise ValueError("non-minimal DER length")
        pos += n
    if pos + length > end:
        raise ValueError("DER element overruns its container")
    return tag, pos, pos + length


def der_children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, cs, ce = der_tlv(data, pos, end)
        out.append((tag, cs, ce))
        pos = ce
    return out


def oid_dotted(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise ValueError("bad OID encoding")
    arcs: list[int] = []
    value = 0
    for b in content:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


@dataclass(frozen=True, slots=True, eq=False)
class _Cert:
    """A parsed certificate with what the checks need precomputed once."""

    der: bytes
    cert: x509.Certificate
    cn: str
    not_before: int
    not_after: int
    serial: int
    public_key: object
    public_key_raw: bytes
    self_signed: bool
    issuer_der: bytes


def _load_cert(der: bytes, what: str, error: type[DcapError]) -> _Cert:
    try:
        cert = x509.load_der_x509_certificate(der)
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else ""
        pub = cert.public_key()
        raw = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        nb = int(cert.not_valid_before_utc.timestamp())
        na = int(cert.not_valid_after_utc.timestamp())
        self_signed = cert.issuer == cert.subject
        issuer_der = cert.issuer.public_bytes()
        serial = cert.serial_number
    except _X509_ERRORS as exc:
        if error is VerificationError:
            raise VerificationError(what, f"certificate does not parse ({exc})") from None
        raise error(f"{what}: certificate does not parse ({exc})") from None
    return _Cert(bytes(der), cert, cn, nb, na, serial, pub, raw, self_signed, issuer_der)


def _pem_chain(pem: bytes | str, what: str, error: type[DcapError]) -> list[_Cert]:
    """Certificates of a PEM chain, leaf first (the order Intel writes them)."""
    if isinstance(pem, str):
        pem = pem.encode("utf-8", "replace")
    certs = []
    for m in _PEM_CERT_RE.finditer(pem):
        try:
            der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            if error is VerificationError:
                raise VerificationError(what, "certificate is not valid base64") from None
            raise error(f"{what}: certificate is not valid base64") from None
        certs.append(_load_cert(der, what, error))
    if not certs:
        if error is VerificationError:
            raise VerificationError(what, "no PEM certificate found")
        raise error(f"{what}: no PEM certificate found")
    return certs


def _signed_by(cert: _Cert, issuer: _Cert) -> bool:
    try:
        cert.cert.verify_directly_issued_by(issuer.cert)
    except (*_X509_ERRORS, InvalidSignature):
        return False
    return True


def _verify_ecdsa(public_key: object, sig_raw: bytes, message: bytes) -> bool:
    if len(sig_raw) != ECDSA_SIG_LEN or not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        public_key.verify(_ecdsa_der(sig_raw), message, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())

# Intel QVL looks for these phrases in subject CNs (X509Constants: SGX_*_CN_PHRASE).
_CN_ROOT = "SGX Root CA"
_CN_INTERMEDIATE = "CA"
_CN_PCK = "SGX PCK Certificate"
_CN_TCB_SIGNING = "SGX TCB Signing"


@dataclass(frozen=True, slots=True)
class _Validity:
    """One time window [start, end] that must contain `now`, with the check named when it does not."""

    piece: str
    what: str
    start: int
    end: int


def _window(items: tuple[_Validity, ...]) -> tuple[int, int]:
    return max(v.start for v in items), min(v.end for v in items)


def _check_validity(items: tuple[_Validity, ...], window: tuple[int, int], now: int) -> None:
    """Fast path: `now` inside the precomputed intersection.  Slow path names the piece that fails."""
    if window[0] <= now <= window[1]:
        return
    if now > window[1]:   # name the piece that expired first: that is when the bundle became unusable
        v = min((v for v in items if now > v.end), key=lambda v: v.end)
        raise VerificationError(f"{v.piece}_expired", f"{v.what} expired at {_iso(v.end)} (now {_iso(now)})")
    v = max((v for v in items if now < v.start), key=lambda v: v.start)
    raise VerificationError(f"{v.piece}_not_yet_valid",
                            f"{v.what} is not valid before {_iso(v.start)} (now {_iso(now)})")


def _cert_validity(piece: str, certs: list[_Cert] | tuple[_Cert, ...]) -> tuple[_Validity, ...]:
    return tuple(_Validity(piece, f"certificate {c.cn!r}", c.not_before, c.not_after) for c in certs)


def _verify_chain(certs: list[_Cert], root: _Cert, check: str, phrases: tuple[str, ...], *,
                  leaf_is_ca: bool = False) -> list[_Cert]:
    """Path from the chain's certificates (any order, extras ignored) to the trusted root, built and
    validated by x509_chain (RFC 5280 via pyca, plus Intel's rules: the root inside the chain and
    byte-identical to the trusted root).  `phrases`: required CN phrase of the leaf, then of each CA
    below the root, as Intel QVL checks them.  Returns the path without the root, leaf first."""
    import x509_chain  # verification only: quote makers (the enclave side) never load it

    spec = x509_chain.PathSpec(phrases[0], phrases[1:], leaf_is_ca)
    try:
        path = x509_chain.build_path([c.cert for c in certs], root.cert, spec, root.der)
    except x509_chain.ChainError as exc:
        raise VerificationError(check, str(exc)) from None
    by_der = {c.der: c for c in certs}
    return [by_der[p.public_bytes(serialization.Encoding.DER)] for p in path]


# ---------------------------------------------------------------------------------------------------
# trusted root
# ---------------------------------------------------------------------------------------------------

INTEL_ROOT_CA_PATH = str(Path(__file__).resolve().parent / "intel_sgx_root_ca.der")
_INTEL_ROOT_SHA256: str | None = None


def _root_der(data: bytes | str) -> bytes:
    """DER of a root given as DER or PEM bytes."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")  # a lone surrogate cannot be part of valid PEM anyway
    if b"-----BEGIN CERTIFICATE-----" in data:
        m = _PEM_CERT_RE.search(data)
        if not m:
            raise VerificationError("root_ca", "PEM root has no complete certificate")
        try:
            return base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            raise VerificationError("root_ca", "PEM root is not valid base64") from None
    return bytes(data)


def intel_root_ca() -> bytes:
    """DER of the Intel SGX Root CA shipped with the project."""
    return Path(INTEL_ROOT_CA_PATH).read_bytes()


def is_intel_root(der: bytes) -> bool:
    """True when `der` is the shipped Intel SGX Root CA (byte-identical)."""
    global _INTEL_ROOT_SHA256
    if _INTEL_ROOT_SHA256 is None:
        try:
            _INTEL_ROOT_SHA256 = hashlib.sha256(intel_root_ca()).hexdigest()
        except OSError:
            return False
    return hashlib.sha256(_root_der(der)).hexdigest() == _INTEL_ROOT_SHA256


# Non-Intel roots already warned about in this process (SHA-256 of the DER).  load_root_ca, which
# the CLIs call, prints its warning on stderr; a Verifier logs one only for a root nobody announced
# yet, so a tool that does both shows exactly one.
_WARNED_ROOTS: set[bytes] = set()


def load_root_ca(path: str | None) -> bytes:
    """Trusted root from a file (DER or PEM), or the shipped Intel root when `path` is None.  Warns on
    stderr when it is not Intel's: quotes then prove nothing about real SGX hardware."""
    if path is None:
        return intel_root_ca()
    try:
        der = _root_der(Path(path).read_bytes())
    except OSError as exc:
        raise DcapError(f"root CA {path}: cannot read ({exc.strerror})") from None
    if not is_intel_root(der):
        print(f"warning: trusted root {path} is not the Intel SGX Root CA; quotes verified against it "
              "prove nothing about genuine SGX hardware", file=sys.stderr)
        _WARNED_ROOTS.add(hashlib.sha256(der).digest())
    return der


def _load_trusted_root(der: bytes) -> _Cert:
    """The trusted root must be a self-signed certificate whose signature verifies (Intel QVL
    verifyRootCACert) with "SGX Root CA" in its CN."""
    root = _load_cert(der, "root_ca", VerificationError)
    if not root.self_signed or not _signed_by(root, root):
        raise VerificationError("root_ca", f"trusted root {root.cn!r} is not a valid self-signed certificate")
    if _CN_ROOT not in root.cn:
        raise VerificationError("root_ca", f"trusted root CN {root.cn!r} does not contain {_CN_ROOT!r}")
    return root


# ---------------------------------------------------------------------------------------------------
# PCK certificate: the Intel SGX extension (OID 1.2.840.113741.1.13.1)
# ---------------------------------------------------------------------------------------------------

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_SGX_EXT = x509.ObjectIdentifier(SGX_EXTENSION_OID)


@dataclass(frozen=True, slots=True)
class PckExtension:
    """What the PCK certificate says about the platform: the TCB it was issued for and its FMSPC."""

    ppid: bytes
    comp_svns: tuple[int, ...]   # SGX TCB component SVNs 1..16
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int


def _der_uint(data: bytes, vs: int, ve: int, name: str) -> int:
    if ve <= vs or ve - vs > 9 or data[vs] & 0x80:
        raise ValueError(f"{name}: not a small non-negative INTEGER")
    return int.from_bytes(data[vs:ve], "big")


def parse_sgx_extension(value: bytes) -> PckExtension:
    """Decode the SGX extension's DER: SEQUENCE OF SEQUENCE {OID, value}.  ValueError when malformed."""
    base = SGX_EXTENSION_OID + "."
    tag, s, e = der_tlv(value, 0, len(value))
    if tag != 0x30 or e != len(value):
        raise ValueError("extension is not one SEQUENCE")
    found: dict[str, tuple[int, int, int]] = {}
    for tag, vs, ve in der_children(value, s, e):
        if tag != 0x30:
            raise ValueError("entry is not a SEQUENCE")
        kids = der_children(value, vs, ve)
        if len(kids) != 2 or kids[0][0] != 0x06:
            raise ValueError("entry is not {OID, value}")
        oid = oid_dotted(value[kids[0][1]:kids[0][2]])
        if oid.startswith(base):
            if oid[len(base):] in found:
                raise ValueError(f"duplicate entry {oid}")
            found[oid[len(base):]] = kids[1]

    def octets(key: str, size: int, name: str) -> bytes:
        if key not in found:
            raise ValueError(f"{name} missing")
        t, vs, ve = found[key]
        if t != 0x04 or ve - vs != size:
            raise ValueError(f"{name}: expected OCTET STRING of {size} bytes")
        return value[vs:ve]

    if "2" not in found or found["2"][0] != 0x30:
        raise ValueError("TCB missing")
    comps: dict[int, int] = {}
    pce_svn = None
    cpu_svn = None
    seen: set[str] = set()
    for tag, vs, ve in der_children(value, found["2"][1], found["2"][2]):
        kids = der_children(value, vs, ve) if tag == 0x30 else []
        if len(kids) != 2 or kids[0][0] != 0x06:
            raise ValueError("TCB entry is not {OID, value}")
        oid = oid_dotted(value[kids[0][1]:kids[0][2]])
        if not oid.startswith(base + "2."):
            continue
        idx = oid[len(base) + 2:]
        t, cs, ce = kids[1]
        if idx in seen:
            raise ValueError(f"duplicate TCB entry {oid}")
        seen.add(idx)
        if idx == "17":
            if t != 0x02:
                raise ValueError("PCESVN: not an INTEGER")
            pce_svn = _der_uint(value, cs, ce, "PCESVN")
        elif idx == "18":
            if t != 0x04 or ce - cs != 16:
                raise ValueError("CPUSVN: expected 16-byte OCTET STRING")
            cpu_svn = value[cs:ce]
        elif idx.isdigit() and 1 <= int(idx) <= 16:
            if t != 0x02:
                raise ValueError(f"SGX TCB COMP{idx} SVN: not an INTEGER")
            comps[int(idx)] = _der_uint(value, cs, ce, f"COMP{idx} SVN")
    if len(comps) != 16 or pce_svn is None or cpu_svn is None:
        raise ValueError("TCB incomplete (needs 16 component SVNs, PCESVN and CPUSVN)")
    if "5" not in found or found["5"][0] != 0x0A:
        raise ValueError("SGX Type missing")
    sgx_type = _der_uint(value, found["5"][1], found["5"][2], "SGX Type")
    ppid = octets("1", 16, "PPID")
    return PckExtension(ppid, tuple(comps[i] for i in range(1, 17)), pce_svn, cpu_svn,
                        octets("3", 2, "PCE-ID"), octets("4", 6, "FMSPC"), sgx_type)


@dataclass(frozen=True, slots=True, eq=False)
class _VerifiedPck:
    """A PCK chain from a quote, verified up to the trusted root (signatures only; time and
    revocation depend on `now` and the collateral, so they are checked per verification)."""

    leaf: _Cert
    intermediate: _Cert
    ext: PckExtension
    ca: str
    validity: tuple[_Validity, ...]
    window: tuple[int, int]


def _check_pck_chain(cert_data: CertificationData, root: _Cert) -> _VerifiedPck:
    if cert_data.type != CERT_PCK_CHAIN:
        raise VerificationError("certification_data", f"certification data type {cert_data.type} is not "
                                f"supported (need {CERT_PCK_CHAIN}: PCK certificate chain)")
    certs = _pem_chain(cert_data.data, "pck_chain", VerificationError)
    leaf, inter = _verify_chain(certs, root, "pck_chain", (_CN_PCK, _CN_INTERMEDIATE))
    key = leaf.public_key
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise VerificationError("pck_chain", "PCK certificate key is not ECDSA P-256")
    try:
        ext_value = leaf.cert.extensions.get_extension_for_oid(_SGX_EXT).value
        ext = parse_sgx_extension(ext_value.value)  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        raise VerificationError("pck_extension", "PCK certificate has no SGX extension") from None
    except (*_X509_ERRORS, AttributeError) as exc:
        raise VerificationError("pck_extension", f"SGX extension is malformed: {exc}") from None
    lowered = inter.cn.lower()
    ca = "processor" if "processor" in lowered else "platform" if "platform" in lowered else inter.cn
    validity = _cert_validity("pck_chain", (leaf, inter, root))
    return _VerifiedPck(leaf, inter, ext, ca, validity, _window(validity))


# ---------------------------------------------------------------------------------------------------
# CRLs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _VerifiedCrl:
    """A CRL whose signature verified under its issuer; revoked serials precomputed as a set."""

    issuer_der: bytes
    issuer_key_raw: bytes
    revoked: frozenset[int]
    validity: tuple[_Validity, ...]


class _Crl(NamedTuple):
    """A CRL with the fields `cryptography` parses lazily (issuer name, dates) already read, so a
    malformed one fails here, as CollateralError, and not at first use."""

    crl: x509.CertificateRevocationList
    issuer: x509.Name
    this_update: int
    next_update: int | None


def _load_crl(der: bytes, piece: str) -> _Crl:
    der = _crl_bytes(der)
    try:
        crl = x509.load_der_x509_crl(der)
        nu = crl.next_update_utc
        return _Crl(crl, crl.issuer, int(crl.last_update_utc.timestamp()),
                    None if nu is None else int(nu.timestamp()))
    except _X509_ERRORS as exc:
        raise CollateralError(f"{piece}: CRL does not parse ({exc})") from None


_CRL_REQUIRED_EXTENSIONS = ((ExtensionOID.CRL_NUMBER, "CRL Number"),
                            (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, "Authority Key Identifier"))


def _check_crl(der: bytes, issuer: _Cert, piece: str) -> _VerifiedCrl:
    """CRL issued by `issuer` (names equal, signature valid).  thisUpdate/nextUpdate are checked
    against `now` later (Intel QVL rejects a CRL that is not yet valid; dcap-qvl does not)."""
    parsed = _load_crl(der, piece)
    crl = parsed.crl
    try:
        present = {ext.oid for ext in crl.extensions}
    except _X509_ERRORS as exc:
        raise CollateralError(f"{piece}: CRL extensions do not parse ({exc})") from None
    missing = [name for oid, name in _CRL_REQUIRED_EXTENSIONS if oid not in present]
    if missing:
        # Intel QVL PckCrlVerifier: STATUS_SGX_CRL_INVALID_EXTENSIONS
        raise VerificationError(piece, f"CRL lacks required extension(s): {', '.join(missing)}")
    if parsed.issuer != issuer.cert.subject:
        raise VerificationError(piece, f"CRL issuer {parsed.issuer.rfc4514_string()!r} is not {issuer.cn!r}")
    import x509_chain  # verification only, as in _verify_chain

    try:
        x509_chain.check_crl_signer(issuer.cert)
    except (ValueError, x509.DuplicateExtension) as exc:
        raise VerificationError(piece, str(exc)) from None
    try:
        ok = crl.is_signature_valid(issuer.public_key)  # type: ignore[arg-type]
    except _X509_ERRORS:
        ok = False
    if not ok:
        raise VerificationError(piece, f"CRL signature does not verify under {issuer.cn!r}")
    if parsed.next_update is None:
        raise VerificationError(piece, "CRL has no nextUpdate")
    try:
        revoked = frozenset(r.serial_number for r in crl)
    except _X509_ERRORS as exc:
        raise CollateralError(f"{piece}: CRL entries do not parse ({exc})") from None
    what = "root CA CRL" if piece == "root_ca_crl" else "PCK CRL"
    return _VerifiedCrl(issuer.cert.subject.public_bytes(), issuer.public_key_raw, revoked,
                        (_Validity(piece, what, parsed.this_update, parsed.next_update),))


# ---------------------------------------------------------------------------------------------------
# TCB info (v2 and v3) and QE identity (v2): signed JSON from Intel PCS
# ---------------------------------------------------------------------------------------------------


def _json_object(text: str, piece: str) -> dict:
    d = _parse_json(text, piece)
    if not isinstance(d, dict):
        raise CollateralError(f"{piece}: must be a JSON object")
    return d


def _field(d: dict, key: str, kind: type | tuple[type, ...], piece: str) -> object:
    if key not in d:
        raise CollateralError(f"{piece}.{key}: missing")
    v = d[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise CollateralError(f"{piece}.{key}: wrong type")
    return v


def _hex_field(d: dict, key: str, size: int, piece: str) -> bytes:
    v = _field(d, key, str, piece)
    try:
        b = bytes.fromhex(v)  # type: ignore[arg-type]
    except ValueError:
        raise CollateralError(f"{piece}.{key}: not hex") from None
    if len(b) != size:
        raise CollateralError(f"{piece}.{key}: must be {size} bytes")
    return b


def _status_field(d: dict, piece: str) -> str:
    status = _field(d, "tcbStatus", str, piece)
    if status not in TCB_STATUSES:
        raise CollateralError(f"{piece}.tcbStatus: unknown status {status!r}")
    return status  # type: ignore[return-value]


def _advisories(d: dict, piece: str) -> tuple[str, ...]:
    ids = d.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise CollateralError(f"{piece}.advisoryIDs: must be a list of strings")
    return tuple(ids)


def _svn(v: object, name: str, limit: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= limit:
        raise CollateralError(f"{name}: must be an integer 0..{limit}")
    return v


@dataclass(frozen=True, slots=True)
class TcbLevel:
    """One platform TCB level of a TCB info: at least these SVNs -> this status."""

    comp_svns: tuple[int, ...]
    pce_svn: int
    status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str
    tdx_svns: tuple[int, ...] = ()   # TDX TCB info: the 16 tdxtcbcomponents SVNs


@dataclass(frozen=True, slots=True, eq=False)
class TcbInfo:
    """TCB info (v2 or v3, id SGX), parsed from the exact signed JSON."""

    version: int
    id: str
    issue_date: int
    next_update: int
    fmspc: bytes
    pce_id: bytes
    tcb_evaluation_data_number: int
    levels: tuple[TcbLevel, ...]   # in Intel QVL's order: SVNs descending
    # TDX TCB info (id "TDX") only: the TDX 1.0 module's identity, and one per module major version
    tdx_module: TdxModuleIdentity | None = None
    tdx_module_identities: tuple[TdxModuleIdentity, ...] = ()

    def match(self, comp_svns: tuple[int, ...], pce_svn: int) -> TcbLevel | None:
        """First level (highest first) whose 16 component SVNs and PCESVN are all <= the platform's."""
        for level in self.levels:
            if pce_svn >= level.pce_svn and all(map(operator.ge, comp_svns, level.comp_svns)):
                return level
        return None


def _tcb_levels(d: dict, p: str, *, required: bool) -> Iterator[tuple[str, dict, dict]]:
    """Each entry of d["tcbLevels"] as (its path, the level object, its "tcb" object), checked to be
    objects; `required` refuses an empty list (TCB info and TDX module identities need a level)."""
    raw_levels = _field(d, "tcbLevels", list, p)
    if required and not raw_levels:
        raise CollateralError(f"{p}.tcbLevels: empty")
    for i, lv in enumerate(raw_levels):  # type: ignore[arg-type]
        lp = f"{p}.tcbLevels[{i}]"
        if not isinstance(lv, dict):
            raise CollateralError(f"{lp}: must be an object")
        yield lp, lv, _field(lv, "tcb", dict, lp)  # type: ignore[misc]


def parse_tcb_info(text: str) -> TcbInfo:
    """TCB info v3 ({"id": "SGX", "tcbLevels": [{"tcb": {"sgxtcbcomponents": [...], "pcesvn"}}]}) or v2
    ({"tcb": {"sgxtcbcomp01svn".."sgxtcbcomp16svn", "pcesvn"}}).  CollateralError names the field."""
    p = "tcb_info"
    d = _json_object(text, p)
    version = _field(d, "version", int, p)
    if version == 3:
        tcb_id = _field(d, "id", str, p)
    elif version == 2:
        tcb_id = "SGX"
    else:
        raise CollateralError(f"{p}.version: unsupported TCB info version {version}")
    levels = []
    for lp, lv, tcb in _tcb_levels(d, p, required=True):
        if version == 3:
            comps = _field(tcb, "sgxtcbcomponents", list, f"{lp}.tcb")
            if len(comps) != 16 or not all(isinstance(c, dict) for c in comps):  # type: ignore[arg-type]
                raise CollateralError(f"{lp}.tcb.sgxtcbcomponents: must be 16 objects")
            svns = tuple(_svn(c.get("svn"), f"{lp}.tcb.sgxtcbcomponents[{j}].svn", 255)
                         for j, c in enumerate(comps))  # type: ignore[arg-type]
        else:
            svns = tuple(_svn(tcb.get(f"sgxtcbcomp{j:02d}svn"), f"{lp}.tcb.sgxtcbcomp{j:02d}svn", 255)  # type: ignore[union-attr]
                         for j in range(1, 17))
        pce = _svn(tcb.get("pcesvn"), f"{lp}.tcb.pcesvn", 0xFFFF)  # type: ignore[union-attr]
        date = lv.get("tcbDate", "")
        tdx_svns = _tdx_components(tcb, f"{lp}.tcb") if tcb_id == "TDX" else ()  # type: ignore[arg-type]
        levels.append(TcbLevel(svns, pce, _status_field(lv, lp), _advisories(lv, lp),
                               date if isinstance(date, str) else "", tdx_svns))
    # Intel QVL keeps levels in a std::set ordered by (CPUSVN components, PCESVN, TDX components)
    # descending and takes the first match; sort the same way so the JSON order cannot change the verdict.
    levels.sort(key=lambda lv: (lv.comp_svns, lv.pce_svn, lv.tdx_svns), reverse=True)
    module, identities = None, ()
    if tcb_id == "TDX":
        if version != 3:
            raise CollateralError(f"{p}.version: a TDX TCB info is version 3")
        module = _tdx_module_identity(d.get("tdxModule"), f"{p}.tdxModule", levels=False)
        raw_ids = d.get("tdxModuleIdentities", [])
        if not isinstance(raw_ids, list):
            raise CollateralError(f"{p}.tdxModuleIdentities: must be a list")
        identities = tuple(_tdx_module_identity(m, f"{p}.tdxModuleIdentities[{i}]", levels=True)
                           for i, m in enumerate(raw_ids))
    return TcbInfo(version, tcb_id, _parse_date(d.get("issueDate"), f"{p}.issueDate"),  # type: ignore[arg-type]
                   _parse_date(d.get("nextUpdate"), f"{p}.nextUpdate"), _hex_field(d, "fmspc", 6, p),
                   _hex_field(d, "pceId", 2, p),
                   _svn(d.get("tcbEvaluationDataNumber"), f"{p}.tcbEvaluationDataNumber", 0xFFFFFFFF),
                   tuple(levels), module, identities)


@dataclass(frozen=True, slots=True)
class TdxModuleLevel:
    """One TCB level of a TDX module identity: module ISVSVN (tee_tcb_svn[0]) at least this -> status."""

    isv_svn: int
    status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str


@dataclass(frozen=True, slots=True)
class TdxModuleIdentity:
    """Who may sign the TDX module (MRSIGNER_SEAM) and its SEAM attributes; `id` "TDX_<major hex>" for
    an entry of tdxModuleIdentities (with TCB levels), "" for the TDX 1.0 `tdxModule`."""

    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[TdxModuleLevel, ...] = ()

    def level_for(self, isv_svn: int) -> TdxModuleLevel | None:
        for level in self.levels:
            if isv_svn >= level.isv_svn:
                return level
        return None


def _tdx_components(tcb: dict, lp: str) -> tuple[int, ...]:
    comps = _field(tcb, "tdxtcbcomponents", list, lp)
    if len(comps) != 16 or not all(isinstance(c, dict) for c in comps):  # type: ignore[arg-type]
        raise CollateralError(f"{lp}.tdxtcbcomponents: must be 16 objects")
    return tuple(_svn(c.get("svn"), f"{lp}.tdxtcbcomponents[{j}].svn", 255)
                 for j, c in enumerate(comps))  # type: ignore[arg-type]


def _tdx_module_identity(d: object, p: str, *, levels: bool) -> TdxModuleIdentity:
    if not isinstance(d, dict):
        raise CollateralError(f"{p}: must be an object")
    out = []
    if levels:
        for lp, lv, tcb in _tcb_levels(d, p, required=True):
            date = lv.get("tcbDate", "")
            isv = _svn(tcb.get("isvsvn"), f"{lp}.tcb.isvsvn", 255)  # type: ignore[union-attr]
            out.append(TdxModuleLevel(isv, _status_field(lv, lp), _advisories(lv, lp),
                                      date if isinstance(date, str) else ""))
        out.sort(key=lambda lv: lv.isv_svn, reverse=True)   # highest first, as Intel QVL walks them
    ident = _field(d, "id", str, p) if levels else ""
    return TdxModuleIdentity(str(ident).upper(), _hex_field(d, "mrsigner", 48, p),
                             _hex_field(d, "attributes", 8, p), _hex_field(d, "attributesMask", 8, p),
                             tuple(out))


@dataclass(frozen=True, slots=True)
class QeTcbLevel:
    isv_svn: int
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True, eq=False)
class QeIdentity:
    """QE identity v2 (id "QE"), parsed from the exact signed JSON."""

    id: str
    version: int
    issue_date: int
    next_update: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: tuple[QeTcbLevel, ...]

    def level_for(self, isv_svn: int) -> QeTcbLevel | None:
        """First level (in JSON order, as Intel QVL walks them) with isvsvn <= the QE's."""
        for level in self.levels:
            if level.isv_svn <= isv_svn:
                return level
        return None


def parse_qe_identity(text: str) -> QeIdentity:
    p = "qe_identity"
    d = _json_object(text, p)
    version = _field(d, "version", int, p)
    if version != 2:
        raise CollateralError(f"{p}.version: unsupported QE identity version {version}")
    levels = []
    for lp, lv, tcb in _tcb_levels(d, p, required=False):
        levels.append(QeTcbLevel(_svn(tcb.get("isvsvn"), f"{lp}.tcb.isvsvn", 0xFFFF),  # type: ignore[union-attr]
                                 _status_field(lv, lp), _advisories(lv, lp)))
    return QeIdentity(
        _field(d, "id", str, p), version,  # type: ignore[arg-type]
        _parse_date(d.get("issueDate"), f"{p}.issueDate"),
        _parse_date(d.get("nextUpdate"), f"{p}.nextUpdate"),
        int.from_bytes(_hex_field(d, "miscselect", 4, p), "little"),
        int.from_bytes(_hex_field(d, "miscselectMask", 4, p), "little"),
        _hex_field(d, "attributes", 16, p), _hex_field(d, "attributesMask", 16, p),
        _hex_field(d, "mrsigner", 32, p), _svn(d.get("isvprodid"), f"{p}.isvprodid", 0xFFFF), tuple(levels))


@dataclass(frozen=True, slots=True, eq=False)
class _SignedJson:
    """A TCB info or QE identity whose signature verified under a TCB signing chain to the root."""

    body: TcbInfo | QeIdentity
    signer: _Cert
    validity: tuple[_Validity, ...]


def _check_signing_chain(chain_pem: str, root: _Cert, piece: str) -> _Cert:
    certs = _pem_chain(chain_pem, f"{piece}_issuer_chain", CollateralError)
    (signer,) = _verify_chain(certs, root, f"{piece}_chain", (_CN_TCB_SIGNING,))
    return signer


def _check_signed_json(text: str, signature: bytes, chain_pem: str, root: _Cert, piece: str) -> _SignedJson:
    signer = _check_signing_chain(chain_pem, root, piece)
    if len(signature) != ECDSA_SIG_LEN:
        raise CollateralError(f"{piece}_signature: must be {ECDSA_SIG_LEN} bytes (r||s)")
    if not _verify_ecdsa(signer.public_key, signature, _utf8(text, piece)):
        raise VerificationError(f"{piece}_signature",
                                f"{piece} signature does not verify under {signer.cn!r}")
    body = parse_tcb_info(text) if piece == "tcb_info" else parse_qe_identity(text)
    what = "TCB info" if piece == "tcb_info" else "QE identity"
    validity = (_Validity(piece, what, body.issue_date, body.next_update),
                *_cert_validity(f"{piece}_chain", (signer,)))
    return _SignedJson(body, signer, validity)


# ---------------------------------------------------------------------------------------------------
# TCB status: platform level x QE level, merged as Intel QVL's convergeTcbStatusWithQeTcbStatus
# ---------------------------------------------------------------------------------------------------


def merge_tcb_status(platform: str, qe: str) -> str:
    """Combined status.  The QE identity only knows UpToDate / OutOfDate / Revoked (Intel QVL maps any
    other non-UpToDate QE status to OutOfDate).  A QE that is OutOfDate makes an UpToDate or
    SWHardeningNeeded platform OutOfDate, and a ConfigurationNeeded or ConfigurationAndSWHardening-
    Needed platform OutOfDateConfigurationNeeded; a Revoked QE makes everything Revoked; otherwise the
    platform status stands.  (dcap-qvl takes the "worse" of the two by rank, which for a
    Configuration* platform and an OutOfDate QE gives OutOfDate instead.)"""
    if qe == "Revoked":
        return "Revoked"
    if qe != "UpToDate":
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return platform


# ---------------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedQuote:
    """A genuine quote: its combined TCB status and the enclave's identity.  A Revoked status or a
    debug enclave is reported here, not raised: refusing them is the appraisal's decision."""

    status: str
    advisory_ids: tuple[str, ...]
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    report_data: bytes
    attributes: bytes
    fmspc: bytes
    collateral_expiry: int
    quote: Quote = field(repr=False)
    platform_status: str = ""
    qe_status: str = ""
    pck_ca: str = ""
    # TDX: for a TD, mr_enclave / mr_signer / attributes are empty and isv_* 0 (a TD has none); its
    # identity is td_report.  tdx_module_id is the module identity matched ("" = tdxModule, TDX 1.0),
    # tdx_module_status that identity's TCB status ("" when the module has none).  `status` may then
    # also be one of TD_RELAUNCH_STATUSES.
    tee_type: str = "SGX"
    td_report: TdReport | None = None
    tdx_module_id: str = ""
    tdx_module_status: str = ""
    padding: int = 0    # zero bytes after the quote's signature data

    def to_dict(self) -> dict[str, object]:
        if self.td_report is not None:
            return {
                "tee_type": self.tee_type,
                "status": self.status,
                "advisory_ids": list(self.advisory_ids),
                "debug": self.debug,
                "td": self.td_report.to_dict(),
                "tdx_module_identity": self.tdx_module_id or "tdxModule",
                "tdx_module_status": self.tdx_module_status,
                "fmspc": self.fmspc.hex(),
                "collateral_expiry": self.collateral_expiry,
                "platform_status": self.platform_status,
                "qe_status": self.qe_status,
                "pck_ca": self.pck_ca,
                "quote_version": self.quote.version,
                "padding": self.padding,
            }
        return {
            "status": self.status,
            "advisory_ids": list(self.advisory_ids),
            "mr_enclave": self.mr_enclave.hex(),
            "mr_signer": self.mr_signer.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "debug": self.debug,
            "report_data": self.report_data.hex(),
            "attributes": self.attributes.hex(),
            "fmspc": self.fmspc.hex(),
            "collateral_expiry": self.collateral_expiry,
            "platform_status": self.platform_status,
            "qe_status": self.qe_status,
            "pck_ca": self.pck_ca,
        }


@dataclass(frozen=True, slots=True, eq=False)
class _VerifiedCollateral:
    """A whole collateral bundle verified against one trusted root, minus the time checks."""

    root_crl: _VerifiedCrl
    pck_crl: _VerifiedCrl
    pck_crl_ca: _Cert
    tcb: TcbInfo
    qe: QeIdentity
    validity: tuple[_Validity, ...]
    window: tuple[int, int]
    expiry: int
    # per-quote results that depend only on this collateral and bytes of the quote (QE report -> QE
    # TCB level, PCK SVNs -> platform TCB level)
    memo: dict = field(default_factory=dict)


class _Cache(dict):
    """A dict that forgets its oldest entries beyond `limit` (keys are content, so entries never go
    stale; the bound only caps memory when fed many distinct inputs)."""

    def __init__(self, limit: int = 256) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: object, value: object) -> None:
        if len(self) >= self.limit:
            for k in list(self)[: self.limit // 4 or 1]:
                self.pop(k, None)   # another thread may have evicted it already
        self[key] = value


class _Caches:
    """Everything verified once, keyed by the exact bytes it was verified from (and the root)."""

    def __init__(self) -> None:
        self.roots = _Cache(16)          # root DER -> _Cert
        self.crls = _Cache()             # (piece, der, issuer DER) -> _VerifiedCrl
        self.chains = _Cache()           # (piece, chain PEM, root DER) -> _Cert (the signer / CA)
        self.signed = _Cache()           # (piece, text, sig, chain PEM, root DER) -> _SignedJson
        self.collateral = _Cache(64)     # (Collateral, root DER) -> _VerifiedCollateral
        self.pck = _Cache(1024)          # (cert data bytes, root DER) -> _VerifiedPck
        self.qe_block = _Cache(1024)     # (PCK leaf, QE report, QE sig, att key, auth) -> attestation key


def _collateral_verified(c: Collateral, root: _Cert, caches: _Caches) -> _VerifiedCollateral:
    """Verify every collateral piece under `root` (each piece cached by its bytes)."""
    rkey = root.der
    key = (c, rkey)
    hit = caches.collateral.get(key)
    if hit is not None:
        return hit
    root_crl = caches.crls.get(("root_ca_crl", c.root_ca_crl, rkey))
    if root_crl is None:
        root_crl = _check_crl(c.root_ca_crl, root, "root_ca_crl")
        caches.crls.put(("root_ca_crl", c.root_ca_crl, rkey), root_crl)
    signed = {}
    for piece, text, sig, chain in (("tcb_info", c.tcb_info, c.tcb_info_signature, c.tcb_info_issuer_chain),
                                    ("qe_identity", c.qe_identity, c.qe_identity_signature,
                                     c.qe_identity_issuer_chain)):
        skey = (piece, text, sig, chain, rkey)
        s = caches.signed.get(skey)
        if s is None:
            s = _check_signed_json(text, sig, chain, root, piece)
            caches.signed.put(skey, s)
        if s.signer.serial in root_crl.revoked:
            raise VerificationError(f"{piece}_chain", f"TCB signing certificate {s.signer.cn!r} is revoked "
                                    "by the root CA CRL")
        signed[piece] = s
    ckey = ("pck_crl_issuer_chain", c.pck_crl_issuer_chain, rkey)
    pck_ca = caches.chains.get(ckey)
    if pck_ca is None:
        certs = _pem_chain(c.pck_crl_issuer_chain, "pck_crl_issuer_chain", CollateralError)
        (pck_ca,) = _verify_chain(certs, root, "pck_crl_chain", (_CN_INTERMEDIATE,), leaf_is_ca=True)
        caches.chains.put(ckey, pck_ca)
    pkey = ("pck_crl", c.pck_crl, pck_ca.der)
    pck_crl = caches.crls.get(pkey)
    if pck_crl is None:
        pck_crl = _check_crl(c.pck_crl, pck_ca, "pck_crl")
        caches.crls.put(pkey, pck_crl)
    tcb, qe = signed["tcb_info"].body, signed["qe_identity"].body
    validity = (*_cert_validity("root_ca", (root,)), *root_crl.validity, *pck_crl.validity,
                *signed["tcb_info"].validity, *signed["qe_identity"].validity,
                *_cert_validity("pck_crl_chain", (pck_ca,)))
    window = _window(validity)
    out = _VerifiedCollateral(root_crl, pck_crl, pck_ca, tcb, qe, validity, window,  # type: ignore[arg-type]
                              window[1])
    caches.collateral.put(key, out)
    return out


def _source_collateral_verified(source: Any, fmspc: bytes, ca: str, root: _Cert, caches: _Caches,
                                now: int) -> _VerifiedCollateral:
    """Collateral from `source`, verified.  When the collateral itself is at fault (a signature, chain or
    CRL that does not verify, a malformed piece, a piece past its date) the source is told to drop it,
    so one bad answer (a PCCS glitch, a tampering proxy) is not served until its unverified nextUpdate;
    the error is then CollateralUnavailable (retryable), caused by the VerificationError that names the
    check.  A piece not yet valid is not dropped: that passes with time (a clock behind the PCCS's)."""
    collateral = source.get(fmspc, ca, now)
    if not isinstance(collateral, Collateral):
        raise CollateralError(f"collateral source returned {type(collateral).__name__}, not a Collateral")
    try:
        vc = _collateral_verified(collateral, root, caches)
        _check_validity(vc.validity, vc.window, now)
    except (VerificationError, CollateralError) as exc:
        if isinstance(exc, VerificationError) and exc.check.endswith("_not_yet_valid"):
            raise
        if not _discard(source, fmspc, ca, collateral, str(exc)):
            raise   # the source keeps serving it (a file): its own error, unchanged
        raise CollateralUnavailable(f"{exc} ({collateral_key_name((fmspc, ca))} from the collateral source "
                                    "is unusable: dropped, to be fetched again)") from exc
    return vc


def _discard(source: Any, fmspc: bytes, ca: str, collateral: Collateral, reason: str) -> bool:
    """Ask the source that handed out `collateral` to forget it; True if it will not serve it again.
    A wrapper source without `discard` (one that only watches lookups, exposing what it wraps as
    `.source`, like functools' __wrapped__) is looked through."""
    for _ in range(8):
        discard = getattr(source, "discard", None)
        if callable(discard):
            return bool(discard(fmspc, ca, collateral, reason))
        source = getattr(source, "source", None)
        if source is None:
            break
    return False


def _pck_verified(quote: Quote, root: _Cert, caches: _Caches) -> _VerifiedPck:
    cd = quote.signature.certification_data
    key = (cd.data, cd.type, root.der)
    hit = caches.pck.get(key)
    if hit is None:
        hit = _check_pck_chain(cd, root)
        caches.pck.put(key, hit)
    return hit


def _qe_report_raw(quote: Quote) -> bytes:
    if quote.raw:
        off = quote.signed_length + 4 + ECDSA_SIG_LEN + ECDSA_KEY_LEN
        if quote.header.version >= SGX_QUOTE_V4:
            off += 6
        return quote.raw[off:off + REPORT_BODY_LEN]
    return quote.signature.qe_report.to_bytes()


def _check_qe_block(quote: Quote, pck: _VerifiedPck,
                    caches: _Caches) -> tuple[ec.EllipticCurvePublicKey, bytes]:
    """QE report signed by the PCK key; QE report data binds the attestation key and QE auth data.
    Returns the attestation public key (which then verifies the ISV signature) and the raw QE report."""
    sig = quote.signature
    qe_raw = _qe_report_raw(quote)
    key = (pck.leaf.der, qe_raw, sig.qe_report_signature, sig.attestation_key, sig.qe_auth_data)
    att = caches.qe_block.get(key)
    if att is not None:
        return att, qe_raw
    # qe_report_signature
    if not _verify_ecdsa(pck.leaf.public_key, sig.qe_report_signature, qe_raw):
        raise VerificationError("qe_report_signature",
                                "QE report signature does not verify under the PCK key")
    # qe_report_data
    expected = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest()
    rd = sig.qe_report.report_data
    if rd[:32] != expected:
        raise VerificationError("qe_report_data",
                                "QE report data is not SHA256(attestation key || QE auth data)")
    if rd[32:] != bytes(32):
        raise VerificationError("qe_report_data", "QE report data bytes 32..63 are not zero")
    try:
        att = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + sig.attestation_key)
    except ValueError:
        raise VerificationError("attestation_key", "attestation key is not a P-256 point") from None
    caches.qe_block.put(key, att)
    return att, qe_raw


def _check_qe_identity(qe: QeIdentity, report: ReportBody, want: str = "QE") -> QeTcbLevel:
    """QE report against the QE identity (Intel QVL EnclaveReportVerifier order); a TD quote's QE is
    judged by the TD QE identity (id "TD_QE")."""
    if qe.id != want:
        if want == "TD_QE":
            raise VerificationError("td_qe_identity_mismatch",
                                    f"QE identity id is {qe.id!r}, a TDX quote needs 'TD_QE'")
        raise VerificationError("qe_identity_mismatch",
                                f"QE identity id is {qe.id!r}, an SGX quote needs 'QE'")
    if report.misc_select & qe.miscselect_mask != qe.miscselect:
        raise VerificationError("qe_miscselect",
                                "QE MISCSELECT does not match the QE identity under its mask")
    attrs = bytes(a & m for a, m in zip(report.attributes, qe.attributes_mask, strict=True))
    if attrs != qe.attributes:
        raise VerificationError("qe_attributes", "QE ATTRIBUTES do not match the QE identity under its mask")
    if report.debug:
        # Intel's QVL refuses a debug QE only through the identity's attributesMask, which Intel's QE
        # identities set over the DEBUG bit (EnclaveReportVerifier.cpp 4.1.2.9.6, just above: such a QE
        # fails there as qe_attributes, as in Intel's QVL).  A debug QE's signature proves nothing (its
        # memory is open to the host), so it is refused here too when the mask lets it through.
        raise VerificationError("qe_debug", "the quoting enclave runs in debug mode (DEBUG attribute set)")
    if report.mr_signer != qe.mrsigner:
        raise VerificationError("qe_mrsigner", "QE MRSIGNER is not the one in the QE identity")
    if report.isv_prod_id != qe.isvprodid:
        raise VerificationError("qe_isvprodid", f"QE ISVPRODID {report.isv_prod_id} is not {qe.isvprodid}")
    level = qe.level_for(report.isv_svn)
    if level is None:
        raise VerificationError("qe_tcb_level",
                                f"QE ISVSVN {report.isv_svn} is below every QE identity TCB level")
    return level


def _merge_advisories(*lists: tuple[str, ...]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for ids in lists:
        for i in ids:
            out[i] = None
    return tuple(out)


def _verify(quote_bytes: bytes | Quote, collateral: Collateral | None, source: object, root: _Cert,
            caches: _Caches, now: int) -> VerifiedQuote:
    """The verification, as the list of Intel QVL's steps."""
    quote = quote_bytes if isinstance(quote_bytes, Quote) else parse_quote(quote_bytes)
    header = quote.header
    # quote header: QE vendor (version, key type and TEE type were checked by parse_quote)
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise VerificationError("qe_vendor_id", f"QE vendor ID {header.qe_vendor_id.hex()} is not Intel's")
    # PCK certificate chain from the quote, up to the trusted root; its SGX extension
    pck = _pck_verified(quote, root, caches)
    # collateral: root CA CRL, PCK CRL, TCB info, QE identity, each under the trusted root, and the
    # validity of every piece at `now`
    if collateral is None:
        kind = TDX_CA_PREFIX + pck.ca if quote.header.tee_type == TEE_TDX else pck.ca
        vc = _source_collateral_verified(source, pck.ext.fmspc, kind, root, caches, now)
    else:
        vc = _collateral_verified(collateral, root, caches)
        _check_validity(vc.validity, vc.window, now)
    _check_validity(pck.validity, pck.window, now)
    # revocation: the root by its own CRL (Intel's root CA CRL is issued by the root: a root listed
    # there has been withdrawn, and nothing under it stands)
    if root.serial in vc.root_crl.revoked:
        raise VerificationError("root_ca_revoked", f"trusted root {root.cn!r} is revoked by its own CRL")
    # revocation: PCK CA by the root CA CRL (the quote's and the PCK CRL issuer chain's: a revoked CA
    # condemns the platform, it does not make the collateral unusable), PCK certificate by the PCK CRL
    # of its own CA
    for ca in (pck.intermediate, vc.pck_crl_ca):
        if ca.serial in vc.root_crl.revoked:
            raise VerificationError("intermediate_revoked", f"{ca.cn!r} is revoked by the root CA CRL")
    if (vc.pck_crl.issuer_der != pck.leaf.issuer_der
            or vc.pck_crl.issuer_key_raw != pck.intermediate.public_key_raw):
        raise VerificationError("pck_crl", f"PCK CRL is issued by {vc.pck_crl_ca.cn!r}, the PCK "
                                f"certificate by {pck.intermediate.cn!r}")
    if pck.leaf.serial in vc.pck_crl.revoked:
        raise VerificationError("pck_revoked", f"PCK certificate serial {pck.leaf.serial:#x} is revoked")
    # TCB info belongs to this platform
    tcb = vc.tcb
    td = quote.header.tee_type == TEE_TDX
    if td and (tcb.id != "TDX" or tcb.version < 3):
        raise VerificationError(
            "tcb_info_mismatch",
            f"TCB info id is {tcb.id!r} (version {tcb.version}), a TDX "
            "quote needs 'TDX' (version 3)")
    if not td and tcb.id != "SGX":
        raise VerificationError("tcb_info_mismatch", f"TCB info id is {tcb.id!r}, an SGX quote needs 'SGX'")
    if tcb.fmspc != pck.ext.fmspc:
        raise VerificationError("tcb_info_mismatch", f"TCB info FMSPC {tcb.fmspc.hex()} is not the PCK "
                                f"certificate's {pck.ext.fmspc.hex()}")
    if tcb.pce_id != pck.ext.pce_id:
        raise VerificationError("tcb_info_mismatch", f"TCB info PCE-ID {tcb.pce_id.hex()} is not the PCK "
                                f"certificate's {pck.ext.pce_id.hex()}")
    # TD: the TDX module's signer and SEAM attributes against the TCB info's module identity
    module = _check_tdx_module(tcb, quote.report) if isinstance(quote.report, TdReport) else None
    # QE report signature and report data; QE identity
    att_key, qe_raw = _check_qe_block(quote, pck, caches)
    qe_level = vc.memo.get(qe_raw)
    if qe_level is None:
        if len(vc.memo) > 4096:
            vc.memo.clear()
        qe_level = _check_qe_identity(vc.qe, quote.signature.qe_report, "TD_QE" if td else "QE")
        vc.memo[qe_raw] = qe_level
    # ISV enclave report signature by the attestation key
    try:
        att_key.verify(_ecdsa_der(quote.signature.isv_signature), quote.signed_bytes, _ECDSA_SHA256)
    except InvalidSignature:
        raise VerificationError("isv_signature",
                                "quote signature does not verify under the attestation key") from None
    if isinstance(quote.report, TdReport):
        return _verified_td(quote, pck, vc, module, qe_level)
    # platform TCB level
    level = vc.memo.get(pck)
    if level is None:
        level = tcb.match(pck.ext.comp_svns, pck.ext.pce_svn)
        vc.memo[pck] = level
    if level is None:
        raise VerificationError("tcb_level", f"no TCB level of FMSPC {tcb.fmspc.hex()} matches the "
                                "platform's SVNs (TCB not supported)")
    report = quote.report
    return VerifiedQuote(
        status=merge_tcb_status(level.status, qe_level.status),
        advisory_ids=_merge_advisories(level.advisory_ids, qe_level.advisory_ids),
        mr_enclave=report.mr_enclave, mr_signer=report.mr_signer, isv_prod_id=report.isv_prod_id,
        isv_svn=report.isv_svn, debug=report.debug, report_data=report.report_data,
        attributes=report.attributes, fmspc=pck.ext.fmspc,
        collateral_expiry=min(vc.expiry, pck.window[1]), quote=quote,
        platform_status=level.status, qe_status=qe_level.status, pck_ca=pck.ca)


# ---------------------------------------------------------------------------------------------------
# TDX: module identity, TCB level (SGX + PCE + TDX components), module TCB, relaunch, convergence
# (Intel QVL QuoteVerifier.cpp 4.1.2.4.11, TdxModuleCheck.cpp, TcbLevelCheck.cpp, TDRelaunchCheck.cpp)
# ---------------------------------------------------------------------------------------------------


def _module_identity_for(tcb: TcbInfo, version: int) -> TdxModuleIdentity | None:
    want = f"TDX_{version:02X}"
    return next((m for m in tcb.tdx_module_identities if m.id == want), None)


def _check_tdx_module(tcb: TcbInfo, report: TdReport) -> TdxModuleIdentity:
    """MRSIGNER_SEAM and SEAM attributes against the module identity of the TDX module's major version
    (tee_tcb_svn[1]; 0 = TDX 1.0, judged by `tdxModule`).  Returns the identity matched."""
    major = report.tee_tcb_svn[1]
    module = tcb.tdx_module
    if major > 0:
        module = _module_identity_for(tcb, major)
        if module is None:
            raise VerificationError(
                "tdx_module_identity",
                f"TCB info has no TDX module identity TDX_{major:02X} "
                f"for the TDX module version {major}")
    if module is None:   # parse_tcb_info requires tdxModule; a TcbInfo built by hand may lack it
        raise VerificationError("tdx_module_identity", "TCB info has no tdxModule")
    if report.mr_signer_seam != module.mrsigner:
        raise VerificationError(
            "tdx_module_identity",
            f"MRSIGNER_SEAM {report.mr_signer_seam.hex()} is not the "
            f"TDX module signer of {module.id or 'tdxModule'}")
    # Intel QVL requires SEAM attributes to be zero and equal to the identity's (its mask is not applied)
    if report.seam_attributes != bytes(8) or report.seam_attributes != module.attributes:
        raise VerificationError(
            "tdx_module_identity",
            f"SEAM attributes {report.seam_attributes.hex()} are not "
            f"those of {module.id or 'tdxModule'} ({module.attributes.hex()})")
    return module


def _tdx_match(tcb: TcbInfo, comp_svns: tuple[int, ...], pce_svn: int,
               tee_tcb_svn: bytes) -> tuple[TcbLevel | None, TcbLevel | None]:
    """(first level the SGX components and PCESVN reach, first level the TDX components reach too).
    With a TDX module major version > 0, tee_tcb_svn bytes 0 and 1 (module SVN and version) are
    judged by the module identity instead, so the TDX comparison starts at byte 2."""
    start = 2 if tee_tcb_svn[1] > 0 else 0
    sgx_level = None
    for level in tcb.levels:
        if pce_svn >= level.pce_svn and all(map(operator.ge, comp_svns, level.comp_svns)):
            if sgx_level is None:
                sgx_level = level
            tdx = level.tdx_svns
            if len(tdx) == 16 and all(tee_tcb_svn[i] >= tdx[i] for i in range(start, 16)):
                return sgx_level, level
    return sgx_level, None


def _converge_module(status: str, module_status: str) -> str:
    """Intel QVL convergeTcbStatusWithTdxModuleStatus."""
    if module_status == "OutOfDate":
        if status in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    if module_status == "Revoked":
        return "Revoked"
    return status


_CONFIG_NEEDED = ("ConfigurationNeeded", "OutOfDateConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                  "TDRelaunchAdvisedConfigurationNeeded")


def _relaunch(report: TdReport, tcb: TcbInfo, sgx_status: str, tdx_status: str, module_status: str,
              qe_status: str) -> str:
    """Intel QVL checkForRelaunch (TD report 1.5): the TD runs on an out-of-date TCB, but the platform
    has since been updated (tee_tcb_svn_2, the TCB a relaunched TD would get, reaches the latest level):
    a relaunch is advised rather than the TD being out of date."""
    svn2 = report.tee_tcb_svn_2 or bytes(16)
    if (qe_status in ("OutOfDate", "Revoked")
            or sgx_status not in ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                                  "ConfigurationAndSWHardeningNeeded")
            or tdx_status not in ("OutOfDate", "OutOfDateConfigurationNeeded")
            or module_status != "OutOfDate"):
        return tdx_status
    latest = tcb.levels[0]
    if svn2[1] == 0:
        reached = svn2[0] >= latest.tdx_svns[0] and svn2[2] >= latest.tdx_svns[2]
    else:
        module2 = _module_identity_for(tcb, svn2[1])
        if module2 is None:
            raise VerificationError(
                "tdx_module_identity",
                f"TCB info has no TDX module identity TDX_{svn2[1]:02X} "
                "for tee_tcb_svn_2's module version")
        reached = svn2[0] >= module2.levels[0].isv_svn and svn2[2] >= latest.tdx_svns[2]
    if not reached:
        return tdx_status
    if sgx_status in _CONFIG_NEEDED or tdx_status in _CONFIG_NEEDED:
        return "TDRelaunchAdvisedConfigurationNeeded"
    return "TDRelaunchAdvised"


@dataclass(frozen=True, slots=True)
class _TdxVerdict:
    status: str            # before the QE's status is folded in
    advisory_ids: tuple[str, ...]
    level: TcbLevel
    module_id: str
    module_status: str


def _tdx_verdict(tcb: TcbInfo, pck: _VerifiedPck, report: TdReport, module: TdxModuleIdentity,
                 qe_status: str) -> _TdxVerdict:
    sgx_level, level = _tdx_match(tcb, pck.ext.comp_svns, pck.ext.pce_svn, report.tee_tcb_svn)
    if sgx_level is None or level is None:
        raise VerificationError(
            "tdx_tcb_level",
            f"no TCB level of FMSPC {tcb.fmspc.hex()} matches the platform's "
            f"SGX SVNs, PCESVN and TEE_TCB_SVN {report.tee_tcb_svn.hex()} (TCB not supported)")
    status, module_status, advisories = level.status, "", level.advisory_ids
    if report.tee_tcb_svn[1] > 0:
        mlevel = module.level_for(report.tee_tcb_svn[0])
        if mlevel is None:
            raise VerificationError(
                "tdx_module_tcb_level",
                f"TDX module ISVSVN {report.tee_tcb_svn[0]} is below "
                f"every TCB level of {module.id} (TCB not supported)")
        module_status, advisories = mlevel.status, _merge_advisories(advisories, mlevel.advisory_ids)
        status = _converge_module(status, module_status)
    if status != "Revoked" and report.is_v15:
        status = _relaunch(report, tcb, sgx_level.status, status, module_status, qe_status)
    return _TdxVerdict(status, advisories, level, module.id, module_status)


def _verified_td(quote: Quote, pck: _VerifiedPck, vc: _VerifiedCollateral, module: TdxModuleIdentity | None,
                 qe_level: QeTcbLevel) -> VerifiedQuote:
    report = quote.report
    assert isinstance(report, TdReport) and module is not None
    key = ("tdx", pck, report.tee_tcb_svn, report.tee_tcb_svn_2, module.id, qe_level.status)
    verdict = vc.memo.get(key)
    if verdict is None:
        verdict = _tdx_verdict(vc.tcb, pck, report, module, qe_level.status)
        vc.memo[key] = verdict
    return VerifiedQuote(
        status=merge_tcb_status(verdict.status, qe_level.status),
        advisory_ids=_merge_advisories(verdict.advisory_ids, qe_level.advisory_ids),
        mr_enclave=b"", mr_signer=b"", isv_prod_id=0, isv_svn=0, debug=report.debug,
        report_data=report.report_data, attributes=b"", fmspc=pck.ext.fmspc,
        collateral_expiry=min(vc.expiry, pck.window[1]), quote=quote,
        platform_status=verdict.level.status, qe_status=qe_level.status, pck_ca=pck.ca,
        tee_type="TDX", td_report=report, tdx_module_id=verdict.module_id,
        tdx_module_status=verdict.module_status, padding=quote.padding)


_SHARED_CACHES = _Caches()


def _trusted_root(root_ca: bytes | str | None, caches: _Caches) -> _Cert:
    der = intel_root_ca() if root_ca is None else _root_der(root_ca)
    root = caches.roots.get(der)
    if root is None:
        root = _load_trusted_root(der)
        caches.roots.put(der, root)
    return root


def verify(quote: bytes, collateral: Collateral, *, root_ca: bytes | None = None,
           now: int | None = None) -> VerifiedQuote:
    """Verify `quote` with `collateral` against `root_ca` (DER or PEM; None = the shipped Intel root) at
    `now` (unix seconds; None = current time).  Raises QuoteError for malformed quote bytes,
    CollateralError for malformed collateral, VerificationError(check=...) when not genuine.

    Verified pieces are remembered by their exact bytes (process-wide, bounded), so repeated calls
    only redo what differs."""
    if not isinstance(collateral, Collateral):
        raise CollateralError("collateral: must be a dcap.Collateral")
    return _verify(quote, collateral, None, _trusted_root(root_ca, _SHARED_CACHES), _SHARED_CACHES, _now(now))


class CollateralSource(Protocol):
    """Where a Verifier gets collateral.  A source that caches and refetches also has
    `discard(fmspc, ca, collateral, reason="") -> bool`: the Verifier calls it when collateral it
    handed out does not verify, and the source forgets that object (True) or keeps serving it (False)."""

    def get(self, fmspc: bytes, ca: str, now: int) -> Collateral: ...
    # `ca` is "processor" or "platform", or for a TD's collateral TDX_CA_PREFIX + one of them.


class Verifier:
    """Verifies quotes against one collateral bundle or source and one trusted root, remembering what
    it has verified: a warm verification parses the quote, checks time windows and revocation with
    set lookups, and verifies one ECDSA signature (the ISV's)."""

    def __init__(self, source: Collateral | CollateralSource, *, root_ca: bytes | str | None = None) -> None:
        if not isinstance(source, Collateral) and not callable(getattr(source, "get", None)):
            raise TypeError("source must be a Collateral or have .get(fmspc, ca, now)")
        self.source = source
        self._collateral = source if isinstance(source, Collateral) else None
        self._caches = _Caches()
        self.root_der = intel_root_ca() if root_ca is None else _root_der(root_ca)
        self.intel_root = is_intel_root(self.root_der)
        digest = hashlib.sha256(self.root_der).digest()
        if not self.intel_root and digest not in _WARNED_ROOTS:
            _WARNED_ROOTS.add(digest)
            _log.warning("dcap.Verifier: trusted root is not the Intel SGX Root CA; quotes verified "
                         "against it prove nothing about genuine SGX hardware")
        self._root: _Cert | None = None

    @property
    def root(self) -> _Cert:
        if self._root is None:
            self._root = _load_trusted_root(self.root_der)
        return self._root

    def verify(self, quote: bytes | Quote, *, now: int | None = None) -> VerifiedQuote:
        return _verify(quote, self._collateral, self.source, self.root, self._caches,
                       int(time.time()) if now is None else int(now))


def collateral_key_name(key: tuple[bytes, str]) -> str:
    """How messages name the collateral of one (FMSPC, PCK CA type)."""
    if key[1].startswith(TDX_CA_PREFIX):
        return f"TDX collateral for FMSPC {key[0].hex()}, {key[1][len(TDX_CA_PREFIX):]} CA"
    return f"collateral for FMSPC {key[0].hex()}, {key[1]} CA"


def collateral_next_update(c: Collateral) -> int:
    """Earliest nextUpdate of the four pieces (unverified: only used to decide when to refetch)."""
    dates = []
    for piece, der in (("root_ca_crl", c.root_ca_crl), ("pck_crl", c.pck_crl)):
        next_update = _load_crl(der, piece).next_update
        if next_update is None:
            raise CollateralError(f"{piece}: CRL has no nextUpdate")
        dates.append(next_update)
    for piece, text in (("tcb_info", c.tcb_info), ("qe_identity", c.qe_identity)):
        dates.append(_parse_date(_json_object(text, piece).get("nextUpdate"), f"{piece}.nextUpdate"))
    return min(dates)


if __name__ == "__main__":
    # The command line wires in the attester, the simulator and PCCS, which this module must not
    # import; it lives in dcap_cli (`python dcap.py ...` keeps working, same commands and exit codes).
    import dcap_cli

    sys.exit(dcap_cli.main())
