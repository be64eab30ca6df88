"""SGX DCAP quotes: parse, serialize and verify them against Intel collateral, in pure Python.

Everything ASPS decides rests on one question: is this SGX quote genuine, and what is the platform's
TCB status?  This module answers it the way Intel's Quote Verification Library (QVL) does, step by
step, each step a small named check that fails with its own reason.

Sections (in file order): errors and constants . quote format . collateral (the JSON bundle) .
DER / X.509 helpers . trusted root . PCK certificate (SGX extension) . CRLs . TCB info and QE
identity . TCB status merge . verify (the steps, VerifiedQuote, Verifier and its caches) .
collateral sources (file, PCCS) . quote providers . command line.

Library API: parse_quote, Collateral.from_json, verify(quote, collateral, root_ca=, now=),
Verifier(source, root_ca=).verify(quote, now=), FileCollateralSource, PccsCollateralSource,
load_root_ca / is_intel_root, get_provider.  CLI: `python dcap.py sim-init | quote | verify`.

What is cached (Verifier, and a bounded process-wide cache behind verify()): every collateral piece
and every PCK chain, keyed by its exact bytes and the trusted root, once its signatures verified.
Time windows and revocation are re-checked on every call against `now`; the ISV signature of each
quote is always verified.

Malformed quote bytes raise QuoteError (and nothing else), malformed collateral CollateralError, a
quote or collateral that is not genuine at `now` VerificationError(check=...).  A genuine quote whose
platform is Revoked, or a debug enclave, is a *result*: the appraisal (ratls/policy) refuses it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import operator
import os
import re
import stat
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
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

_log = logging.getLogger("dcap")
_log.addHandler(logging.NullHandler())  # a library: the application decides where warnings go

if __name__ == "__main__":
    # `python dcap.py ...`: let `import dcap` (sgxsim) find this very module, so there is
    # one set of classes (Collateral, the errors) and not two.
    sys.modules.setdefault("dcap", sys.modules[__name__])

# ---------------------------------------------------------------------------------------------------
# errors and constants
# ---------------------------------------------------------------------------------------------------


class DcapError(Exception):
    """Base of every error this module raises on purpose."""


class QuoteError(DcapError):
    """Malformed quote bytes; the message names the field.  The only error parse_quote raises."""


class CollateralError(DcapError):
    """Malformed collateral (JSON, CRL DER, certificates, TCB info / QE identity fields)."""


class VerificationError(DcapError):
    """The quote is not genuine, or the collateral is not valid at `now`.

    `.check` names the failing step (e.g. "pck_chain", "tcb_info_signature") so callers and tests can
    tell refusals apart without parsing messages.
    """

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.reason = message


class CollateralUnavailable(DcapError):
    """PCCS/PCS unreachable or answering with a server error; retrying later may help."""


class ProviderError(DcapError):
    """Quote generation failed (no SGX device, driver error, bad report data)."""


SGX_QUOTE_V3 = 3
SGX_QUOTE_V4 = 4
ATT_KEY_ECDSA_P256 = 2
ATT_KEY_ECDSA_P384 = 3
TEE_SGX = 0
TEE_TDX = 0x81
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

# Certification data types (Intel SGX ECDSA Quote Library API, "Certification Data").
CERT_PPID_CLEARTEXT = 1
CERT_PPID_RSA2048 = 2
CERT_PPID_RSA3072 = 3
CERT_PCK_CLEARTEXT = 4
CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6
CERT_PLATFORM_MANIFEST = 7

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

HEADER_LEN = 48
REPORT_BODY_LEN = 384
ECDSA_SIG_LEN = 64
ECDSA_KEY_LEN = 64
# Variable-length fields larger than this are refused rather than trusted (a PCK chain is ~4 KiB).
MAX_VAR_LEN = 1 << 20

# ---------------------------------------------------------------------------------------------------
# quote format
# ---------------------------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked cursor over bytes: every short read becomes a QuoteError naming the field."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int, name: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise QuoteError(f"{name}: truncated (need {n} bytes at offset {self.pos}, have "
                             f"{len(self.data) - self.pos})")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def u16(self, name: str) -> int:
        return int.from_bytes(self.take(2, name), "little")

    def u32(self, name: str) -> int:
        return int.from_bytes(self.take(4, name), "little")

    def rest(self) -> int:
        return len(self.data) - self.pos


def _fixed(value: bytes, n: int, name: str) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != n:
        raise QuoteError(f"{name}: must be {n} bytes")


@dataclass(frozen=True, slots=True)
class QuoteHeader:
    """The 48-byte quote header.  In v3 the `tee_type` field is reserved and must be 0 (SGX)."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    def to_bytes(self) -> bytes:
        return (struct.pack("<HHIHH", self.version, self.attestation_key_type, self.tee_type,
                            self.qe_svn, self.pce_svn) + self.qe_vendor_id + self.user_data)

    @classmethod
    def from_bytes(cls, data: bytes) -> QuoteHeader:
        if len(data) != HEADER_LEN:
            raise QuoteError(f"header: must be {HEADER_LEN} bytes, got {len(data)}")
        version, akt, tee, qe_svn, pce_svn = struct.unpack_from("<HHIHH", data)
        return cls(version, akt, tee, qe_svn, pce_svn, bytes(data[12:28]), bytes(data[28:48]))


_REPORT_LAYOUT = (
    # (field, size) in wire order; ints are little-endian of that size.
    ("cpu_svn", 16), ("misc_select", 4), ("reserved1", 12), ("isv_ext_prod_id", 16),
    ("attributes", 16), ("mr_enclave", 32), ("reserved2", 32), ("mr_signer", 32),
    ("reserved3", 32), ("config_id", 64), ("isv_prod_id", 2), ("isv_svn", 2), ("config_svn", 2),
    ("reserved4", 42), ("isv_family_id", 16), ("report_data", 64),
)
_REPORT_INTS = frozenset({"misc_select", "isv_prod_id", "isv_svn", "config_svn"})
_REPORT_STRUCT = struct.Struct("<16sI12s16s16s32s32s32s32s64sHHH42s16s64s")
assert _REPORT_STRUCT.size == REPORT_BODY_LEN


@dataclass(frozen=True, slots=True)
class ReportBody:
    """An SGX enclave report body (384 bytes): the ISV enclave's, or the QE's own report."""

    cpu_svn: bytes
    misc_select: int
    reserved1: bytes
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    reserved2: bytes
    mr_signer: bytes
    reserved3: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    reserved4: bytes
    isv_family_id: bytes
    report_data: bytes

    @property
    def debug(self) -> bool:
        """SGX_FLAGS_DEBUG (attributes.flags bit 1): the enclave's memory is readable by a debugger."""
        return bool(self.attributes[0] & 0x02)

    def to_bytes(self) -> bytes:
        for name, size in _REPORT_LAYOUT:
            if name not in _REPORT_INTS:
                _fixed(getattr(self, name), size, f"report.{name}")
        try:
            return _REPORT_STRUCT.pack(*(getattr(self, name) for name, _ in _REPORT_LAYOUT))
        except struct.error as exc:
            raise QuoteError(f"report: integer field out of range ({exc})") from None

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "report") -> ReportBody:
        if len(data) != REPORT_BODY_LEN:
            raise QuoteError(f"{name}: must be {REPORT_BODY_LEN} bytes, got {len(data)}")
        return cls(*_REPORT_STRUCT.unpack(bytes(data)))


@dataclass(frozen=True, slots=True)
class CertificationData:
    """Certification data: `type` (5 = PCK certificate chain as PEM) and its raw bytes."""

    type: int
    data: bytes

    def to_bytes(self) -> bytes:
        return struct.pack("<HI", self.type, len(self.data)) + self.data


@dataclass(frozen=True, slots=True)
class QuoteSignatureData:
    """ECDSA-P256 quote signature data.  For v4 quotes the QE report fields come out of the type-6
    certification data and `certification_data` is the type-5 PCK chain inside it, so both versions
    are verified by one code path."""

    isv_signature: bytes
    attestation_key: bytes
    qe_report: ReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    certification_data: CertificationData

    def _qe_part(self) -> bytes:
        return (self.qe_report.to_bytes() + self.qe_report_signature
                + struct.pack("<H", len(self.qe_auth_data)) + self.qe_auth_data
                + self.certification_data.to_bytes())

    def to_bytes(self, version: int) -> bytes:
        """Signature data as it appears after the 4-byte length in a quote of `version`."""
        head = self.isv_signature + self.attestation_key
        if version == SGX_QUOTE_V4:
            return head + CertificationData(CERT_QE_REPORT, self._qe_part()).to_bytes()
        return head + self._qe_part()


@dataclass(frozen=True, slots=True)
class Quote:
    """A parsed SGX ECDSA quote; `raw` keeps the exact bytes it was parsed from."""

    header: QuoteHeader
    report: ReportBody
    signature: QuoteSignatureData
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def signed_bytes(self) -> bytes:
        """Header || report body: the bytes the attestation key signs."""
        if self.raw:
            return self.raw[:HEADER_LEN + REPORT_BODY_LEN]
        return self.header.to_bytes() + self.report.to_bytes()

    @property
    def version(self) -> int:
        return self.header.version

    def to_bytes(self) -> bytes:
        sig = self.signature.to_bytes(self.header.version)
        return self.header.to_bytes() + self.report.to_bytes() + struct.pack("<I", len(sig)) + sig


def _read_cert_data(r: _Reader, name: str) -> CertificationData:
    ctype = r.u16(f"{name}.type")
    if not CERT_PPID_CLEARTEXT <= ctype <= CERT_PLATFORM_MANIFEST:
        raise QuoteError(f"{name}.type: unknown certification data type {ctype}")
    size = r.u32(f"{name}.size")
    if size > MAX_VAR_LEN:
        raise QuoteError(f"{name}.size: {size} bytes is larger than allowed")
    return CertificationData(ctype, r.take(size, f"{name}.data"))


def _read_qe_part(r: _Reader, where: str) -> tuple[ReportBody, bytes, bytes, CertificationData]:
    qe_report = ReportBody.from_bytes(r.take(REPORT_BODY_LEN, f"{where}qe_report"), f"{where}qe_report")
    qe_sig = r.take(ECDSA_SIG_LEN, f"{where}qe_report_signature")
    auth_len = r.u16(f"{where}qe_auth_data.size")
    auth = r.take(auth_len, f"{where}qe_auth_data")
    cert = _read_cert_data(r, f"{where}certification_data")
    return qe_report, qe_sig, auth, cert


def parse_quote(data: bytes) -> Quote:
    """Parse an SGX ECDSA-P256 quote, version 3 or 4.  Raises QuoteError only.

    Strict on purpose: every declared length must match exactly (no trailing bytes anywhere), so
    `parse_quote(b).to_bytes() == b` holds for every accepted input.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise QuoteError("quote: must be bytes")
    data = bytes(data)
    r = _Reader(data)
    header = QuoteHeader.from_bytes(r.take(HEADER_LEN, "header"))
    if header.tee_type != TEE_SGX:
        if header.tee_type == TEE_TDX:
            raise QuoteError("header.tee_type: unsupported TEE type TDX (0x81); only SGX is supported")
        raise QuoteError(f"header.tee_type: unsupported TEE type {header.tee_type:#x}")
    if header.version not in (SGX_QUOTE_V3, SGX_QUOTE_V4):
        raise QuoteError(f"header.version: unsupported quote version {header.version}")
    if header.attestation_key_type != ATT_KEY_ECDSA_P256:
        raise QuoteError(f"header.attestation_key_type: unsupported attestation key type "
                         f"{header.attestation_key_type} (only ECDSA-256-with-P-256 = 2)")
    report = ReportBody.from_bytes(r.take(REPORT_BODY_LEN, "report"), "report")
    sig_len = r.u32("signature_data.size")
    if sig_len != r.rest():
        raise QuoteError(f"signature_data.size: declares {sig_len} bytes but {r.rest()} follow")
    isv_sig = r.take(ECDSA_SIG_LEN, "signature_data.isv_signature")
    att_key = r.take(ECDSA_KEY_LEN, "signature_data.attestation_key")
    if header.version == SGX_QUOTE_V3:
        qe_report, qe_sig, auth, cert = _read_qe_part(r, "signature_data.")
    else:
        outer = _read_cert_data(r, "signature_data.certification_data")
        if outer.type != CERT_QE_REPORT:
            raise QuoteError(f"signature_data.certification_data.type: v4 quote needs type 6 (QE report "
                             f"certification data), got {outer.type}")
        inner = _Reader(outer.data)
        qe_report, qe_sig, auth, cert = _read_qe_part(inner, "qe_report_certification_data.")
        if inner.rest():
            raise QuoteError(f"qe_report_certification_data: {inner.rest()} trailing bytes")
    if cert.type == CERT_QE_REPORT:
        raise QuoteError("certification_data.type: QE report certification data may not nest itself")
    if r.rest():
        raise QuoteError(f"signature_data: {r.rest()} trailing bytes after certification data")
    sig = QuoteSignatureData(isv_sig, att_key, qe_report, qe_sig, auth, cert)
    return Quote(header, report, sig, data)


# ---------------------------------------------------------------------------------------------------
# collateral
# ---------------------------------------------------------------------------------------------------

_COLLATERAL_HEX = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")
_COLLATERAL_STR = ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "tcb_info", "qe_identity_issuer_chain",
                   "qe_identity")


@dataclass(frozen=True, slots=True)
class Collateral:
    """The verification collateral for one quote, in dcap-qvl's QuoteCollateralV3 JSON shape.

    `tcb_info` / `qe_identity` are the exact signed JSON strings (the signature covers those bytes, so
    they must never be re-serialized); CRLs are DER; signatures are raw r||s (64 bytes).
    """

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes

    @classmethod
    def from_dict(cls, d: object) -> Collateral:
        if not isinstance(d, dict):
            raise CollateralError("collateral: must be a JSON object")
        missing = [k for k in (*_COLLATERAL_STR, *_COLLATERAL_HEX) if k not in d]
        if missing:
            raise CollateralError(f"collateral: missing field(s) {', '.join(missing)}")
        values: dict[str, object] = {}
        for k in _COLLATERAL_STR:
            v = d[k]
            if not isinstance(v, str):
                raise CollateralError(f"collateral.{k}: must be a string")
            values[k] = v
        for k in _COLLATERAL_HEX:
            values[k] = _hex_or_bytes(d[k], f"collateral.{k}")
        return cls(**values)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k in ("pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain", "tcb_info",
                  "tcb_info_signature", "qe_identity_issuer_chain", "qe_identity", "qe_identity_signature"):
            v = getattr(self, k)
            out[k] = v.hex() if isinstance(v, bytes) else v
        return out

    @classmethod
    def from_json(cls, text: str | bytes) -> Collateral:
        return cls.from_dict(_parse_json(text, "collateral"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _parse_json(text: str | bytes, piece: str) -> object:
    """json.loads for every JSON entry point (collateral bundle, TCB info, QE identity, PCCS bodies):
    whatever the text, only CollateralError.  Besides syntax errors (ValueError), json raises
    UnicodeDecodeError on bytes that are not UTF-8, ValueError on integers beyond int's digit limit,
    and RecursionError on nesting deeper than the interpreter's stack ("[" * 100000)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise CollateralError(f"{piece}: not valid JSON ({reason})") from None


def _utf8(text: str, piece: str) -> bytes:
    """The UTF-8 bytes a signature covers.  A str from JSON may hold a lone surrogate (the escape
    \\ud800), which no UTF-8 text, and so no signed text, contains."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CollateralError(f"{piece}: not valid UTF-8 text (lone surrogate)") from None


def _hex_or_bytes(v: object, name: str) -> bytes:
    """Hex string (dcap-qvl JSON) or a list of byte values (some tools write Vec<u8> as a JSON array)."""
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        try:
            return bytes.fromhex(v)
        except ValueError:
            raise CollateralError(f"{name}: not valid hex") from None
    if isinstance(v, list) and all(isinstance(x, int) and 0 <= x <= 255 for x in v):
        return bytes(v)
    raise CollateralError(f"{name}: must be a hex string")


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


def _now(now: int | None) -> int:
    return int(time.time()) if now is None else int(now)


def _iso(ts: int) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"unix {ts}"


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


def _crl_bytes(data: bytes) -> bytes:
    """CRLs arrive as DER, as hex of DER (PCCS rootcacrl) or as PEM; return DER."""
    data = bytes(data)
    if data[:1] == b"\x30":
        return data
    text = data.strip()
    if text.startswith(b"-----BEGIN X509 CRL-----"):
        body = text.split(b"-----")[2]
        try:
            return base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            return data
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return data


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

    def match(self, comp_svns: tuple[int, ...], pce_svn: int) -> TcbLevel | None:
        """First level (highest first) whose 16 component SVNs and PCESVN are all <= the platform's."""
        for level in self.levels:
            if pce_svn >= level.pce_svn and all(map(operator.ge, comp_svns, level.comp_svns)):
                return level
        return None


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
    raw_levels = _field(d, "tcbLevels", list, p)
    if not raw_levels:
        raise CollateralError(f"{p}.tcbLevels: empty")
    for i, lv in enumerate(raw_levels):  # type: ignore[arg-type]
        lp = f"{p}.tcbLevels[{i}]"
        if not isinstance(lv, dict):
            raise CollateralError(f"{lp}: must be an object")
        tcb = _field(lv, "tcb", dict, lp)
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
        levels.append(TcbLevel(svns, pce, _status_field(lv, lp), _advisories(lv, lp),
                               date if isinstance(date, str) else ""))
    # Intel QVL keeps levels in a std::set ordered by (CPUSVN components, PCESVN) descending and takes
    # the first match; sort the same way so the JSON order cannot change the verdict.
    levels.sort(key=lambda lv: (lv.comp_svns, lv.pce_svn), reverse=True)
    return TcbInfo(version, tcb_id, _parse_date(d.get("issueDate"), f"{p}.issueDate"),  # type: ignore[arg-type]
                   _parse_date(d.get("nextUpdate"), f"{p}.nextUpdate"), _hex_field(d, "fmspc", 6, p),
                   _hex_field(d, "pceId", 2, p),
                   _svn(d.get("tcbEvaluationDataNumber"), f"{p}.tcbEvaluationDataNumber", 0xFFFFFFFF),
                   tuple(levels))


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
    raw_levels = _field(d, "tcbLevels", list, p)
    for i, lv in enumerate(raw_levels):  # type: ignore[arg-type]
        lp = f"{p}.tcbLevels[{i}]"
        if not isinstance(lv, dict):
            raise CollateralError(f"{lp}: must be an object")
        tcb = _field(lv, "tcb", dict, lp)
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

    def to_dict(self) -> dict[str, object]:
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
        raise CollateralUnavailable(f"{exc} ({_key_name((fmspc, ca))} from the collateral source is "
                                    "unusable: dropped, to be fetched again)") from exc
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
        off = HEADER_LEN + REPORT_BODY_LEN + 4 + ECDSA_SIG_LEN + ECDSA_KEY_LEN
        if quote.header.version == SGX_QUOTE_V4:
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


def _check_qe_identity(qe: QeIdentity, report: ReportBody) -> QeTcbLevel:
    """QE report against the QE identity (Intel QVL EnclaveReportVerifier order)."""
    if qe.id != "QE":
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
        vc = _source_collateral_verified(source, pck.ext.fmspc, pck.ca, root, caches, now)
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
    if tcb.id != "SGX":
        raise VerificationError("tcb_info_mismatch", f"TCB info id is {tcb.id!r}, an SGX quote needs 'SGX'")
    if tcb.fmspc != pck.ext.fmspc:
        raise VerificationError("tcb_info_mismatch", f"TCB info FMSPC {tcb.fmspc.hex()} is not the PCK "
                                f"certificate's {pck.ext.fmspc.hex()}")
    if tcb.pce_id != pck.ext.pce_id:
        raise VerificationError("tcb_info_mismatch", f"TCB info PCE-ID {tcb.pce_id.hex()} is not the PCK "
                                f"certificate's {pck.ext.pce_id.hex()}")
    # QE report signature and report data; QE identity
    att_key, qe_raw = _check_qe_block(quote, pck, caches)
    qe_level = vc.memo.get(qe_raw)
    if qe_level is None:
        if len(vc.memo) > 4096:
            vc.memo.clear()
        qe_level = _check_qe_identity(vc.qe, quote.signature.qe_report)
        vc.memo[qe_raw] = qe_level
    # ISV enclave report signature by the attestation key
    try:
        att_key.verify(_ecdsa_der(quote.signature.isv_signature), quote.signed_bytes, _ECDSA_SHA256)
    except InvalidSignature:
        raise VerificationError("isv_signature",
                                "quote signature does not verify under the attestation key") from None
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


# ---------------------------------------------------------------------------------------------------
# collateral sources
# ---------------------------------------------------------------------------------------------------


class FileCollateralSource:
    """One collateral bundle from a JSON file (dcap-qvl QuoteCollateralV3 shape), for every FMSPC.
    Re-read when the file changes, so a refreshed bundle is picked up without a restart."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._collateral: Collateral | None = None

    def get(self, fmspc: bytes = b"", ca: str = "", now: int | None = None) -> Collateral:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if self._collateral is None or stamp != self._stamp:
                self._collateral = Collateral.from_json(self.path.read_bytes())
                self._stamp = stamp
        except OSError as exc:
            # The verifier's own input is missing, not the quote's fault: retryable once the file is back.
            msg = f"collateral file {self.path}: cannot read ({exc.strerror})"
            raise CollateralUnavailable(msg) from None
        return self._collateral

    def discard(self, fmspc: bytes, ca: str, collateral: Collateral, reason: str = "") -> bool:
        """Nothing to drop: the file is what the operator gave, re-read as soon as it changes."""
        return False


_TCB_OBJECT_RE = re.compile(r'"(tcbInfo|enclaveIdentity)"\s*:\s*')


def _signed_body(text: str, key: str, what: str) -> tuple[str, bytes]:
    """From PCS's {"tcbInfo": {...}, "signature": "hex"}: the exact bytes of the signed object (the
    signature covers them as sent, so they are cut out, never re-serialized) and the signature."""
    doc = _parse_json(text, f"{what} response")
    if (not isinstance(doc, dict) or not isinstance(doc.get(key), dict)
            or not isinstance(doc.get("signature"), str)):
        raise CollateralError(f"{what}: response lacks {key!r} object or 'signature'")
    for m in _TCB_OBJECT_RE.finditer(text):
        if m.group(1) == key:
            try:
                _, end = json.JSONDecoder().raw_decode(text, m.end())
            except (ValueError, RecursionError):
                continue
            body = text[m.end():end]
            break
    else:
        raise CollateralError(f"{what}: cannot locate the {key!r} object")
    try:
        sig = bytes.fromhex(doc["signature"])
    except ValueError:
        raise CollateralError(f"{what}: signature is not hex") from None
    return body, sig


class _Reply(NamedTuple):
    """One PCCS answer, its body read in full (and bounded)."""

    url: str
    headers: Mapping[str, str]
    body: bytes

    def text(self, what: str) -> str:
        """The body as text: JSON is UTF-8 (RFC 8259), and Intel signs the UTF-8 bytes."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise CollateralError(f"{what}: response from {self.url} is not UTF-8") from None


# PCS/PCCS answers are small (TCB info ~10 KiB, the largest PCK CRLs tens of KiB).  A longer answer is
# refused, and never buffered beyond this.
MAX_PCCS_RESPONSE = 2 << 20


def _response_socket(raw: object) -> Any:
    """The socket under a urllib3 response, or None (other versions or transports): used only to cut
    each socket read to the time left before the deadline (without it, a fetch can overrun its
    deadline by one read timeout).  urllib3 keeps it on its connection object, or, for an answer with
    "Connection: close", only under http.client's socket file (fp.raw is the socket.SocketIO)."""
    for path in (("_connection", "sock"), ("_fp", "fp", "raw", "_sock")):
        obj: Any = raw
        for name in path:
            obj = getattr(obj, name, None)
        if callable(getattr(obj, "settimeout", None)):
            return obj
    return None


class _Failure(NamedTuple):
    """The last failed fetch for one (FMSPC, CA type).  Its error class is kept: an unknown FMSPC
    (PCCS 404) stays that platform's CollateralError, never a retryable outage of the service."""

    at: float            # time.monotonic(), for the back-off
    unix: float          # time.time(), for the message
    kind: type[DcapError]
    reason: str
    refused: Collateral | None = None  # an answer that did not verify: the same again is refused too

    def error(self, message: str | None = None) -> DcapError:
        return self.kind(self.reason if message is None else message)


class _Flight:
    """One fetch in progress: callers for the same key wait on `done`, then take `outcome`."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: Collateral | _Failure | None = None


class PccsCollateralSource:
    """Collateral from Intel PCS or a PCCS over the v4 API, cached per (FMSPC, CA type) until the
    earliest nextUpdate among the pieces, so a warm verification makes no HTTP request.

    `base_url` is the service root (e.g. https://api.trustedservices.intel.com or
    https://pccs.example:8081); "/sgx/certification/v4" is appended unless already there.

    `timeout` bounds one whole fetch (the four requests, bodies included), not each socket read: a
    server that trickles its answer cannot hold the caller longer (CollateralUnavailable).  Each
    answer is capped at `max_response` bytes (CollateralError); a longer one is not read.

    A PCCS that hangs or fails must not cost a fetch per verification (each one holding a server
    thread for up to `timeout`), hence two guards per key, neither of which ever serves collateral
    past its nextUpdate:
    - single flight: while a fetch is in progress, other callers wait for its outcome (at most
      `timeout` seconds) instead of starting their own;
    - back-off: for `retry_after` seconds after a fetch failed (CollateralUnavailable or
      CollateralError), callers get that error again at once, saying when and why, without asking
      the PCCS (0 disables).  Cached collateral that is still fresh is served meanwhile.

    nextUpdate is read before any signature is checked, so an answer is trusted only once verified:
    the Verifier `discard`s collateral that does not verify, which counts as a failed fetch (same
    back-off), and while that failure is remembered the same answer fetched again is refused without
    being handed out, so health stays down for as long as the PCCS serves it.  An answer already past
    its nextUpdate is a failed fetch too (CollateralUnavailable), not refetched on every call."""

    API = "/sgx/certification/v4"
    MAX_FAILURES = 1024  # failed keys remembered (FMSPCs come from quotes: bounded)

    def __init__(self, base_url: str, *, timeout: float = 10.0, session: object | None = None,
                 max_response: int = MAX_PCCS_RESPONSE, retry_after: float = 5.0) -> None:
        base = base_url.rstrip("/")
        self.base = base if base.endswith(self.API) else base + self.API
        self.timeout = timeout
        self.max_response = max_response
        self.retry_after = retry_after
        self._session = session
        self._cache: dict[tuple[bytes, str], tuple[Collateral, int]] = {}
        self._flights: dict[tuple[bytes, str], _Flight] = {}
        self._failures: dict[tuple[bytes, str], _Failure] = {}  # oldest first
        self._lock = threading.Lock()
        self.requests = 0   # HTTP requests made (for tests and metrics)

    @property
    def session(self):  # type: ignore[no-untyped-def]
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session

    def _get(self, path: str, what: str, deadline: float, params: dict[str, str] | None = None) -> _Reply:
        import requests

        url = self.base + path
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CollateralUnavailable(f"{what}: no time left to ask {url} (the whole fetch may take "
                                        f"{self.timeout:g} s)")
        with self._lock:
            self.requests += 1
        try:
            # stream: the body is read below, bounded in size and time; identity: what is counted
            # against the bound is what arrives (no decompression bomb)
            resp = self.session.get(url, params=params, timeout=(remaining, remaining),  # type: ignore[attr-defined]
                                    stream=True, headers={"Accept-Encoding": "identity"})
        except requests.RequestException as exc:
            raise CollateralUnavailable(f"{what}: {url} unreachable ({type(exc).__name__})") from None
        with contextlib.closing(resp):
            if resp.status_code >= 500 or resp.status_code == 429:
                raise CollateralUnavailable(f"{what}: HTTP {resp.status_code} from {url}")
            if resp.status_code != 200:
                raise CollateralError(f"{what}: HTTP {resp.status_code} from {url}")
            return _Reply(url, resp.headers, self._read_body(resp.raw, resp.headers, url, what, deadline))

    def _read_body(self, raw: Any, headers: Mapping[str, str], url: str, what: str, deadline: float) -> bytes:
        """The body, refused as soon as it is known to exceed `max_response` (from Content-Length, or
        while reading), and given up on at the deadline whatever the pace the server sends at."""
        import urllib3

        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise CollateralError(f"{what}: {url} answered with Content-Encoding {encoding[:40]!r}, "
                                  "not identity as asked")
        try:
            declared = int(headers.get("Content-Length", "0"))
        except ValueError:
            declared = 0
        if declared > self.max_response:
            raise CollateralError(f"{what}: {url} announces {declared} bytes, more than the "
                                  f"{self.max_response} allowed")
        read = getattr(raw, "read1", None) or raw.read   # read1: what has arrived, not a full buffer
        sock = _response_socket(raw)
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CollateralUnavailable(f"{what}: {url} did not answer in full within {self.timeout:g} s")
            if sock is not None:
                with contextlib.suppress(OSError):  # closed once http.client has read the whole body
                    sock.settimeout(remaining)
            try:
                chunk = read(65536, decode_content=False)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                timed_out = isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError)
                raise CollateralUnavailable(
                    f"{what}: {url} did not answer in full within {self.timeout:g} s" if timed_out
                    else f"{what}: reading the answer from {url} failed ({type(exc).__name__})") from None
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_response:
                raise CollateralError(f"{what}: answer from {url} is longer than the {self.max_response} "
                                      "bytes allowed")
            chunks.append(chunk)

    @staticmethod
    def _chain(reply: _Reply, header: str, what: str) -> str:
        value = reply.headers.get(header)
        if not value:
            raise CollateralError(f"{what}: response has no {header} header")
        chain = urllib.parse.unquote(value)
        if "-----BEGIN CERTIFICATE-----" not in chain:
            raise CollateralError(f"{what}: {header} is not a PEM chain")
        return chain

    def fetch(self, fmspc: bytes, ca: str) -> Collateral:
        """Fetch all four pieces now (no cache), within `timeout` seconds in all."""
        if ca not in ("processor", "platform"):
            raise CollateralError(f"PCK CA type must be 'processor' or 'platform', not {ca!r}")
        deadline = time.monotonic() + self.timeout
        tcb = self._get("/tcb", "TCB info", deadline, {"fmspc": fmspc.hex()})
        tcb_info, tcb_sig = _signed_body(tcb.text("TCB info"), "tcbInfo", "TCB info")
        tcb_chain = self._chain(tcb, "TCB-Info-Issuer-Chain", "TCB info")
        qe = self._get("/qe/identity", "QE identity", deadline)
        qe_identity, qe_sig = _signed_body(qe.text("QE identity"), "enclaveIdentity", "QE identity")
        qe_chain = self._chain(qe, "SGX-Enclave-Identity-Issuer-Chain", "QE identity")
        crl = self._get("/pckcrl", "PCK CRL", deadline, {"ca": ca, "encoding": "der"})
        pck_crl = _crl_bytes(crl.body)
        crl_chain = self._chain(crl, "SGX-PCK-CRL-Issuer-Chain", "PCK CRL")
        root_crl = _crl_bytes(self._get("/rootcacrl", "root CA CRL", deadline).body)
        return Collateral(crl_chain, root_crl, pck_crl, tcb_chain, tcb_info, tcb_sig, qe_chain, qe_identity,
                          qe_sig)

    def get(self, fmspc: bytes, ca: str, now: int | None = None) -> Collateral:
        """Cached collateral still fresh at `now`; else the outcome of the fetch in progress for this
        key, the recent failure again (back-off), or a new fetch."""
        now = _now(now)
        key = (bytes(fmspc), ca)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now <= hit[1]:
                return hit[0]
            self._check_back_off(key)
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _Flight()
                leader = True
            else:
                leader = False
        return self._lead(key, flight, now) if leader else self._follow(key, flight)

    def discard(self, fmspc: bytes, ca: str, collateral: Collateral, reason: str = "") -> bool:
        """`collateral`, handed out by get, did not verify: forget it and back off as after a failed
        fetch.  Only that very object is dropped (a newer one fetched meanwhile stays).  True: this
        source will not hand it out again."""
        key = (bytes(fmspc), ca)
        with self._lock:
            hit = self._cache.get(key)
            if hit is None or hit[0] is not collateral:
                return True   # already dropped or replaced
            del self._cache[key]
            if self.retry_after > 0:
                reason = reason or f"{_key_name(key)}: did not verify"
                self._remember_failure(key, _Failure(time.monotonic(), time.time(), CollateralUnavailable,
                                                     reason, collateral))
        _log.warning("%s: discarded, it does not verify (%s)", _key_name(key), reason[:300])
        return True

    def _check_back_off(self, key: tuple[bytes, str]) -> None:
        """Raise the last failure again if it is younger than `retry_after` (caller holds the lock)."""
        failure = self._failures.get(key)
        if failure is None:
            return
        age = time.monotonic() - failure.at
        if age < self.retry_after:
            # the reason first: it is what a client or the health status shows, possibly cut short
            raise failure.error(
                f"{failure.reason} ({_key_name(key)}: the last fetch failed {age:.1f} s ago, at "
                f"{_iso(int(failure.unix))}; not retried for another {self.retry_after - age:.1f} s)")

    def _lead(self, key: tuple[bytes, str], flight: _Flight, now: int) -> Collateral:
        """Fetch for everyone waiting on `flight`; the outcome is recorded (cache or failure) in the
        same step that ends the flight, so no caller can slip in between and fetch again."""
        refused = None
        try:
            collateral = self.fetch(*key)
            expiry = collateral_next_update(collateral)
            if expiry < now:
                raise CollateralUnavailable(f"{_key_name(key)}: the PCCS answered with collateral past its "
                                            f"nextUpdate ({_iso(expiry)}, now {_iso(now)})")
            with self._lock:
                prior = self._failures.get(key)
            if prior is not None and prior.refused == collateral:
                refused = collateral
                raise CollateralUnavailable(prior.reason)
        except BaseException as exc:
            known = isinstance(exc, CollateralUnavailable | CollateralError)
            reason = str(exc) if known else f"{_key_name(key)}: fetch failed ({type(exc).__name__})"
            failure = _Failure(time.monotonic(), time.time(), type(exc) if known else CollateralUnavailable,
                               reason, refused)
            with self._lock:
                if known and self.retry_after > 0:
                    self._remember_failure(key, failure)
                del self._flights[key]
            flight.outcome = failure
            flight.done.set()
            raise
        with self._lock:
            self._cache[key] = (collateral, expiry)
            self._failures.pop(key, None)
            del self._flights[key]
        flight.outcome = collateral
        flight.done.set()
        return collateral

    def _follow(self, key: tuple[bytes, str], flight: _Flight) -> Collateral:
        """Wait for the fetch in progress, no longer than one fetch of our own would take."""
        if not flight.done.wait(self.timeout):
            raise CollateralUnavailable(f"{_key_name(key)}: the fetch in progress did not finish "
                                        f"within {self.timeout:g} s")
        if isinstance(flight.outcome, _Failure):
            raise flight.outcome.error() from None
        assert flight.outcome is not None
        return flight.outcome

    def _remember_failure(self, key: tuple[bytes, str], failure: _Failure) -> None:
        """Record `failure` for `key`, dropping entries past `retry_after` (and the oldest beyond
        MAX_FAILURES) first (caller holds the lock)."""
        self._failures.pop(key, None)
        while self._failures:
            oldest = next(iter(self._failures))
            if (len(self._failures) < self.MAX_FAILURES
                    and failure.at - self._failures[oldest].at < self.retry_after):
                break
            del self._failures[oldest]
        self._failures[key] = failure


def _key_name(key: tuple[bytes, str]) -> str:
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


def open_collateral_source(collateral_file: str | None,
                           pccs_url: str | None) -> Collateral | CollateralSource:
    """What a CLI's --collateral / --pccs options name (exactly one of them)."""
    if bool(collateral_file) == bool(pccs_url):
        raise DcapError("give exactly one of --collateral FILE or --pccs URL")
    if collateral_file:
        return FileCollateralSource(collateral_file)
    return PccsCollateralSource(pccs_url)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# quote providers: Occlum (/dev/sgx ioctls), Gramine (/dev/attestation), the simulated platform
# (sgxsim, imported only when asked for), and Intel's native QVL as an optional verifier backend
# ---------------------------------------------------------------------------------------------------


class QuoteProvider(Protocol):
    name: str

    def get_quote(self, report_data: bytes) -> bytes: ...


REPORT_DATA_SIZE = 64  # sizeof(sgx_report_data_t)
# Header (48) + report body (384) + signature_data length (4): no quote can be shorter.
MIN_QUOTE_SIZE = 48 + 384 + 4
# A DCAP quote with its PCK chain is ~5 KiB; a size beyond this is a broken driver, not a quote.
MAX_QUOTE_SIZE = 1 << 20

OCCLUM_DEVICE = "/dev/sgx"
GRAMINE_ROOT = "/dev/attestation"
NATIVE_QVL_LIB = "libsgx_dcap_quoteverify.so.1"

IoctlFn = Callable[[int, int, Any], Any]


def _os_reason(exc: OSError) -> str:
    """'ENOENT (No such file or directory)': the errno name is what people search for."""
    name = errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")
    return f"{name} ({exc.strerror or exc})"


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes | bytearray | memoryview):
        raise ProviderError("report_data must be bytes")
    report_data = bytes(report_data)
    if len(report_data) != REPORT_DATA_SIZE:
        raise ProviderError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    return report_data


def _check_quote(quote: bytes, report_data: bytes, source: str) -> bytes:
    """A provider's output is only a quote if it parses and carries the report_data we asked for.

    Catching this here turns a confused driver (short read, stale user_report_data, wrong buffer)
    into a clear local error instead of a verification failure on the far side.
    """
    if len(quote) < MIN_QUOTE_SIZE:
        raise ProviderError(f"{source} returned a short quote: {len(quote)} bytes "
                                 f"(a quote has at least {MIN_QUOTE_SIZE})")
    try:
        parsed = parse_quote(quote)
    except QuoteError as exc:
        raise ProviderError(f"{source} returned a malformed quote: {exc}") from None
    if parsed.report.report_data != report_data:
        raise ProviderError(f"{source} returned a quote for different report_data "
                                 "(the enclave did not take ours)")
    return quote


# ---------------------------------------------------------------------------------------------------
# Occlum: /dev/sgx ioctls (occlum src/libos/src/fs/dev_fs/dev_sgx, tools/toolchains/dcap_lib)
# ---------------------------------------------------------------------------------------------------

SGXIOC_GET_DCAP_QUOTE_SIZE = 0x80047307  # _IOR('s', 7, uint32_t)
SGXIOC_GEN_DCAP_QUOTE = 0xC0187308  # _IOWR('s', 8, IoctlGenDCAPQuoteArg)
SGXIOC_GET_DCAP_SUPPLEMENTAL_SIZE = 0x80047309  # _IOR('s', 9, uint32_t)
SGXIOC_VER_DCAP_QUOTE = 0xC030730A  # _IOWR('s', 10, IoctlVerDCAPQuoteArg)


def ioc_size(request: int) -> int:
    """The argument size encoded in a Linux ioctl number (bits 16..29)."""
    return (request >> 16) & 0x3FFF


class GenDcapQuoteArg(ctypes.Structure):
    """Occlum's IoctlGenDCAPQuoteArg: three pointers, 24 bytes on x86_64."""

    _fields_ = (
        ("report_data", ctypes.c_void_p),  # const sgx_report_data_t* (64 bytes), input
        ("quote_size", ctypes.c_void_p),  # uint32_t*, input: buffer length
        ("quote_buf", ctypes.c_void_p),  # uint8_t*, output
    )


class VerDcapQuoteArg(ctypes.Structure):
    """Occlum's IoctlVerDCAPQuoteArg; the two u32 fields are padded to 8, 48 bytes = 0x30 in all."""

    _fields_ = (
        ("quote_buf", ctypes.c_void_p),  # const uint8_t*, input
        ("quote_size", ctypes.c_uint32),  # input
        ("collateral_expiration_status", ctypes.c_void_p),  # uint32_t*, output
        ("quote_verification_result", ctypes.c_void_p),  # sgx_ql_qv_result_t* (u32 enum), output
        ("supplemental_data_size", ctypes.c_uint32),  # input, optional
        ("supplemental_data", ctypes.c_void_p),  # uint8_t*, output, optional
    )


def _check_ioctl_layouts() -> None:
    """The ioctl numbers encode the argument size; a layout that disagrees would corrupt enclave memory.

    Checked when a provider is made, not at import, so a 32-bit host can still import dcap.
    """
    for arg, request in ((GenDcapQuoteArg, SGXIOC_GEN_DCAP_QUOTE), (VerDcapQuoteArg, SGXIOC_VER_DCAP_QUOTE)):
        if ctypes.sizeof(arg) != ioc_size(request):
            raise ProviderError(f"occlum: {arg.__name__} is {ctypes.sizeof(arg)} bytes here, the ioctl "
                                  f"expects {ioc_size(request)} (Occlum runs on x86_64 only)")


class QvlResult(NamedTuple):
    """What Intel's verifier (native QVL, or Occlum's in-enclave ioctl) says about a quote."""

    status: str  # one of TCB_STATUSES
    collateral_expiration_status: int  # 0: all collateral valid at the check date


class OcclumProvider:
    """Quotes from inside an Occlum enclave through the LibOS's /dev/sgx ioctls."""

    name = "occlum"

    def __init__(self, device: str | os.PathLike[str] = OCCLUM_DEVICE, *,
                 ioctl: IoctlFn = fcntl.ioctl) -> None:
        _check_ioctl_layouts()
        self.device = str(device)
        self._ioctl = ioctl

    def _call(self, request: int, label: str, arg: Any) -> None:
        """Open the device, issue one ioctl, close; any OSError becomes a ProviderError naming the step."""
        try:
            fd = os.open(self.device, os.O_RDONLY)
        except OSError as exc:
            raise ProviderError(f"occlum: cannot open {self.device}: {_os_reason(exc)}") from None
        try:
            self._ioctl(fd, request, arg)
        except OSError as exc:
            raise ProviderError(f"occlum: ioctl {label} on {self.device} failed: "
                                  f"{_os_reason(exc)}") from None
        finally:
            os.close(fd)

    def _u32(self, request: int, label: str) -> int:
        out = ctypes.c_uint32(0)
        self._call(request, label, out)
        return out.value

    def quote_size(self) -> int:
        size = self._u32(SGXIOC_GET_DCAP_QUOTE_SIZE, "GET_DCAP_QUOTE_SIZE")
        if not MIN_QUOTE_SIZE <= size <= MAX_QUOTE_SIZE:
            raise ProviderError(f"occlum: GET_DCAP_QUOTE_SIZE reported an implausible quote size {size}")
        return size

    def get_quote(self, report_data: bytes) -> bytes:
        report_data = _check_report_data(report_data)
        size = self.quote_size()
        rd = ctypes.create_string_buffer(report_data, REPORT_DATA_SIZE)
        size_io = ctypes.c_uint32(size)
        buf = ctypes.create_string_buffer(size)
        arg = GenDcapQuoteArg(ctypes.addressof(rd), ctypes.addressof(size_io), ctypes.addressof(buf))
        self._call(SGXIOC_GEN_DCAP_QUOTE, "GEN_DCAP_QUOTE", arg)
        # Occlum fills exactly GET_DCAP_QUOTE_SIZE bytes; honour a smaller size if it writes one back.
        if size_io.value > size:
            raise ProviderError(f"occlum: GEN_DCAP_QUOTE reported {size_io.value} bytes, "
                                  f"more than the {size}-byte buffer")
        return _check_quote(buf.raw[: size_io.value], report_data, "occlum GEN_DCAP_QUOTE")

    def supplemental_data_size(self) -> int:
        size = self._u32(SGXIOC_GET_DCAP_SUPPLEMENTAL_SIZE, "GET_DCAP_SUPPLEMENTAL_SIZE")
        if size > MAX_QUOTE_SIZE:
            raise ProviderError(f"occlum: implausible supplemental data size {size}")
        return size

    def verify_quote(self, quote: bytes) -> QvlResult:
        """Intel's verifier as Occlum runs it for the enclave (collateral from the host's PCCS config)."""
        quote = bytes(quote)
        if not quote:
            raise ProviderError("occlum: empty quote")
        supp_size = self.supplemental_data_size()
        qbuf = ctypes.create_string_buffer(quote, len(quote))
        expiration = ctypes.c_uint32(0)
        result = ctypes.c_uint32(0xFFFFFFFF)  # a driver that writes nothing must not read as "OK"
        supp = ctypes.create_string_buffer(max(supp_size, 1))
        arg = VerDcapQuoteArg(
            ctypes.addressof(qbuf), len(quote), ctypes.addressof(expiration), ctypes.addressof(result),
            supp_size, ctypes.addressof(supp) if supp_size else None,
        )
        self._call(SGXIOC_VER_DCAP_QUOTE, "VER_DCAP_QUOTE", arg)
        return QvlResult(_qv_result_status(result.value, "occlum VER_DCAP_QUOTE"), expiration.value)


# ---------------------------------------------------------------------------------------------------
# Gramine: /dev/attestation pseudo-files
# ---------------------------------------------------------------------------------------------------


class GramineProvider:
    """Quotes from inside a Gramine-SGX enclave through /dev/attestation (attestation_type "dcap")."""

    name = "gramine"

    def __init__(self, root: str | os.PathLike[str] = GRAMINE_ROOT) -> None:
        self.root = Path(root)

    def attestation_type(self) -> str:
        path = self.root / "attestation_type"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ProviderError(f"gramine: cannot read {path}: {_os_reason(exc)}") from None
        return raw.rstrip(b"\0\n ").decode("ascii", "replace")

    def get_quote(self, report_data: bytes) -> bytes:
        report_data = _check_report_data(report_data)
        kind = self.attestation_type()
        if kind != "dcap":
            raise ProviderError(f"gramine: attestation_type is {kind!r}, need 'dcap' "
                                  "(set sgx.remote_attestation = \"dcap\" in the manifest)")
        urd = self.root / "user_report_data"
        try:
            fd = os.open(urd, os.O_WRONLY)
            try:
                written = os.write(fd, report_data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ProviderError(f"gramine: cannot write {urd}: {_os_reason(exc)}") from None
        if written != REPORT_DATA_SIZE:
            raise ProviderError(f"gramine: short write to {urd}: {written} of {REPORT_DATA_SIZE} bytes")
        qpath = self.root / "quote"
        try:
            quote = qpath.read_bytes()
        except OSError as exc:
            raise ProviderError(f"gramine: cannot read {qpath}: {_os_reason(exc)}") from None
        return _check_quote(quote, report_data, f"gramine {qpath}")


# ---------------------------------------------------------------------------------------------------
# Native Intel QVL (libsgx_dcap_quoteverify) through ctypes
# ---------------------------------------------------------------------------------------------------

# sgx_ql_qv_result_t (QuoteVerification/QvE/Include/sgx_qve_header.h) -> our combined status names.
QV_RESULT_STATUS = {
    0x0000: "UpToDate",  # SGX_QL_QV_RESULT_OK
    0xA001: "ConfigurationNeeded",  # SGX_QL_QV_RESULT_CONFIG_NEEDED
    0xA002: "OutOfDate",  # SGX_QL_QV_RESULT_OUT_OF_DATE
    0xA003: "OutOfDateConfigurationNeeded",  # SGX_QL_QV_RESULT_OUT_OF_DATE_CONFIG_NEEDED
    0xA005: "Revoked",  # SGX_QL_QV_RESULT_REVOKED (genuine signature; TCB level or PCK revoked)
    0xA007: "SWHardeningNeeded",  # SGX_QL_QV_RESULT_SW_HARDENING_NEEDED
    0xA008: "ConfigurationAndSWHardeningNeeded",  # SGX_QL_QV_RESULT_CONFIG_AND_SW_HARDENING_NEEDED
}
# Results that mean "not genuine": errors, never statuses.
QV_RESULT_ERRORS = {
    0xA004: "SGX_QL_QV_RESULT_INVALID_SIGNATURE",
    0xA006: "SGX_QL_QV_RESULT_UNSPECIFIED",
    0xA009: "SGX_QL_QV_RESULT_TD_RELAUNCH_ADVISED",
    0xA00A: "SGX_QL_QV_RESULT_TD_RELAUNCH_ADVISED_CONFIG_NEEDED",
}

# quote3_error_t (QuoteGeneration/quote_wrapper/common/inc/sgx_ql_lib_common.h), the ones worth naming.
QUOTE3_ERRORS = {
    0xE001: "SGX_QL_ERROR_UNEXPECTED",
    0xE002: "SGX_QL_ERROR_INVALID_PARAMETER",
    0xE003: "SGX_QL_ERROR_OUT_OF_MEMORY",
    0xE016: "SGX_QL_ENCLAVE_LOAD_ERROR",
    0xE019: "SGX_QL_NETWORK_ERROR",
    0xE01B: "SGX_QL_NO_QUOTE_COLLATERAL_DATA",
    0xE01C: "SGX_QL_QUOTE_CERTIFICATION_DATA_UNSUPPORTED",
    0xE01D: "SGX_QL_QUOTE_FORMAT_UNSUPPORTED",
    0xE01E: "SGX_QL_UNABLE_TO_GENERATE_REPORT",
    0xE01F: "SGX_QL_QE_REPORT_INVALID_SIGNATURE",
    0xE020: "SGX_QL_QE_REPORT_UNSUPPORTED_FORMAT",
    0xE021: "SGX_QL_PCK_CERT_UNSUPPORTED_FORMAT",
    0xE022: "SGX_QL_PCK_CERT_CHAIN_ERROR",
    0xE023: "SGX_QL_TCBINFO_UNSUPPORTED_FORMAT",
    0xE024: "SGX_QL_TCBINFO_MISMATCH",
    0xE025: "SGX_QL_QEIDENTITY_UNSUPPORTED_FORMAT",
    0xE026: "SGX_QL_QEIDENTITY_MISMATCH",
    0xE02C: "SGX_QL_SGX_TCB_INFO_EXPIRED",
    0xE02D: "SGX_QL_SGX_PCK_CERT_CHAIN_EXPIRED",
    0xE02E: "SGX_QL_SGX_CRL_EXPIRED",
    0xE02F: "SGX_QL_SGX_SIGNING_CERT_CHAIN_EXPIRED",
    0xE030: "SGX_QL_SGX_ENCLAVE_IDENTITY_EXPIRED",
    0xE031: "SGX_QL_PCK_REVOKED",
    0xE032: "SGX_QL_TCB_REVOKED",
    0xE034: "SGX_QL_UNABLE_TO_GET_COLLATERAL",
    0xE038: "SGX_QL_CRL_UNSUPPORTED_FORMAT",
    0xE039: "SGX_QL_QEIDENTITY_CHAIN_ERROR",
    0xE03A: "SGX_QL_TCBINFO_CHAIN_ERROR",
    0xE03B: "SGX_QL_ERROR_QVL_QVE_MISMATCH",
    0xE040: "SGX_QL_SERVICE_UNAVAILABLE",
    0xE041: "SGX_QL_NETWORK_FAILURE",
    0xE042: "SGX_QL_SERVICE_TIMEOUT",
    0xE052: "SGX_QL_PSW_NOT_AVAILABLE",
    0xE053: "SGX_QL_COLLATERAL_VERSION_NOT_SUPPORTED",
    0xE061: "SGX_QL_QEIDENTITY_NOT_FOUND",
    0xE062: "SGX_QL_TCBINFO_NOT_FOUND",
    0xE063: "SGX_QL_INTERNAL_SERVER_ERROR",
    0xE065: "SGX_QL_ROOT_CA_UNTRUSTED",
    0xE066: "SGX_QL_TCB_NOT_SUPPORTED",
}
# The library could not reach PCCS: retryable, not a verdict on the quote.
_QUOTE3_UNAVAILABLE = {0xE019, 0xE01B, 0xE034, 0xE040, 0xE041, 0xE042, 0xE061, 0xE062, 0xE063}
# The library or platform itself failed: not a verdict on the quote either.
_QUOTE3_BACKEND = {0xE001, 0xE002, 0xE003, 0xE016, 0xE03B, 0xE052}


def _qv_result_status(value: int, source: str) -> str:
    """Map sgx_ql_qv_result_t to a status name; a result that denies genuineness is an error."""
    if value in QV_RESULT_STATUS:
        return QV_RESULT_STATUS[value]
    name = QV_RESULT_ERRORS.get(value, "unknown sgx_ql_qv_result_t")
    raise VerificationError("native_qvl_result", f"{source}: {name} ({value:#06x})")


class SgxQlQveCollateral(ctypes.Structure):
    """sgx_ql_qve_collateral_t: version (major u16, minor u16), tee_type, then 7 (char*, u32 size)."""

    _fields_ = (
        ("major_version", ctypes.c_uint16),
        ("minor_version", ctypes.c_uint16),
        ("tee_type", ctypes.c_uint32),
        ("pck_crl_issuer_chain", ctypes.c_void_p),
        ("pck_crl_issuer_chain_size", ctypes.c_uint32),
        ("root_ca_crl", ctypes.c_void_p),
        ("root_ca_crl_size", ctypes.c_uint32),
        ("pck_crl", ctypes.c_void_p),
        ("pck_crl_size", ctypes.c_uint32),
        ("tcb_info_issuer_chain", ctypes.c_void_p),
        ("tcb_info_issuer_chain_size", ctypes.c_uint32),
        ("tcb_info", ctypes.c_void_p),
        ("tcb_info_size", ctypes.c_uint32),
        ("qe_identity_issuer_chain", ctypes.c_void_p),
        ("qe_identity_issuer_chain_size", ctypes.c_uint32),
        ("qe_identity", ctypes.c_void_p),
        ("qe_identity_size", ctypes.c_uint32),
    )


COLLATERAL_FIELDS = ("pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain", "tcb_info",
                     "qe_identity_issuer_chain", "qe_identity")


def collateral_strings(collateral: Any) -> dict[str, bytes]:
    """Our Collateral as the NUL-terminated strings QPL hands to QVL (PCS v3+ API, collateral v3.0).

    CRLs as base16 DER (minor version 0), TCB info and QE identity as the PCS response bodies
    (`{"tcbInfo":<signed JSON>,"signature":"<hex>"}`), which re-wraps the exact signed bytes.
    Sizes count the terminating NUL, as QPL's do.
    """
    tcb_sig = collateral.tcb_info_signature.hex()
    qe_sig = collateral.qe_identity_signature.hex()
    return {
        "pck_crl_issuer_chain": _utf8(collateral.pck_crl_issuer_chain, "pck_crl_issuer_chain") + b"\0",
        "root_ca_crl": collateral.root_ca_crl.hex().encode() + b"\0",
        "pck_crl": collateral.pck_crl.hex().encode() + b"\0",
        "tcb_info_issuer_chain": _utf8(collateral.tcb_info_issuer_chain, "tcb_info_issuer_chain") + b"\0",
        "tcb_info": _utf8(f'{{"tcbInfo":{collateral.tcb_info},"signature":"{tcb_sig}"}}', "tcb_info") + b"\0",
        "qe_identity_issuer_chain": (_utf8(collateral.qe_identity_issuer_chain, "qe_identity_issuer_chain")
                                     + b"\0"),
        "qe_identity": (_utf8(f'{{"enclaveIdentity":{collateral.qe_identity},"signature":"{qe_sig}"}}',
                              "qe_identity") + b"\0"),
    }


def _load_qvl(lib: str) -> ctypes.CDLL:
    """dlopen the library and declare the two prototypes (sgx_dcap_quoteverify.h)."""
    try:
        handle = ctypes.CDLL(lib)
        size_fn = handle.sgx_qv_get_quote_supplemental_data_size
        verify_fn = handle.sgx_qv_verify_quote
    except (OSError, AttributeError) as exc:
        raise ProviderError(f"native QVL: cannot load {lib}: {exc}") from None
    size_fn.argtypes = (ctypes.POINTER(ctypes.c_uint32),)
    size_fn.restype = ctypes.c_uint32  # quote3_error_t
    verify_fn.argtypes = (
        ctypes.c_void_p,  # const uint8_t* p_quote
        ctypes.c_uint32,  # uint32_t quote_size
        ctypes.c_void_p,  # const sgx_ql_qve_collateral_t* (NULL: the library fetches via its QPL/PCCS)
        ctypes.c_int64,  # time_t expiration_check_date (64-bit long on x86_64 Linux)
        ctypes.POINTER(ctypes.c_uint32),  # uint32_t* p_collateral_expiration_status
        ctypes.POINTER(ctypes.c_uint32),  # sgx_ql_qv_result_t* p_quote_verification_result
        ctypes.c_void_p,  # sgx_ql_qe_report_info_t* p_qve_report_info (NULL: QVL, no QvE)
        ctypes.c_uint32,  # uint32_t supplemental_data_size
        ctypes.c_void_p,  # uint8_t* p_supplemental_data
    )
    verify_fn.restype = ctypes.c_uint32
    return handle


def native_qvl_available(lib: str = NATIVE_QVL_LIB) -> bool:
    """True when Intel's quote verification library can be loaded with both entry points."""
    try:
        _load_qvl(lib)
    except Exception:
        return False
    return True


class NativeQvlVerifier:
    """Intel's own QVL (libsgx_dcap_quoteverify) as an optional verifier backend.

    Runs in QVL mode (no QvE report), so its answer is as trustworthy as the host it runs on: use
    it on the tenant side, or to cross-check the pure-Python verifier.
    """

    name = "native-qvl"

    def __init__(self, lib: str = NATIVE_QVL_LIB) -> None:
        self.lib = lib
        self._handle = _load_qvl(lib)

    def supplemental_data_size(self) -> int:
        size = ctypes.c_uint32(0)
        rc = self._handle.sgx_qv_get_quote_supplemental_data_size(ctypes.byref(size))
        if rc != 0:
            raise ProviderError(f"native QVL: sgx_qv_get_quote_supplemental_data_size returned "
                                  f"{QUOTE3_ERRORS.get(rc, 'error')} ({rc:#06x})")
        if size.value > MAX_QUOTE_SIZE:
            raise ProviderError(f"native QVL: implausible supplemental data size {size.value}")
        return size.value

    def verify(self, quote: bytes, *, now: int | None = None, collateral: Any = None) -> QvlResult:
        """Verify `quote` at `now` (default: the current time).

        `collateral` (a Collateral) is passed to the library as sgx_ql_qve_collateral_t; None lets
        the library fetch it through its own QPL configuration (/etc/sgx_default_qcnl.conf).
        """
        quote = bytes(quote)
        if not quote or len(quote) > 0xFFFFFFFF:
            raise ProviderError(f"native QVL: quote size {len(quote)} not representable")
        check_date = int(time.time()) if now is None else int(now)
        supp_size = self.supplemental_data_size()
        qbuf = ctypes.create_string_buffer(quote, len(quote))
        supp = ctypes.create_string_buffer(max(supp_size, 1))
        expiration = ctypes.c_uint32(0)
        result = ctypes.c_uint32(0xFFFFFFFF)  # a library that writes nothing must not read as "OK"
        keep: list[Any] = []  # the buffers the collateral struct points into must outlive the call
        coll_ptr = None
        if collateral is not None:
            coll = SgxQlQveCollateral(major_version=3, minor_version=0, tee_type=0)
            for field_name, value in collateral_strings(collateral).items():
                buf = ctypes.create_string_buffer(value, len(value))
                keep.append(buf)
                setattr(coll, field_name, ctypes.addressof(buf))
                setattr(coll, field_name + "_size", len(value))
            keep.append(coll)
            coll_ptr = ctypes.addressof(coll)
        rc = self._handle.sgx_qv_verify_quote(
            ctypes.addressof(qbuf), len(quote), coll_ptr, check_date, ctypes.byref(expiration),
            ctypes.byref(result), None, supp_size, ctypes.addressof(supp) if supp_size else None,
        )
        if rc != 0:
            what = f"sgx_qv_verify_quote returned {QUOTE3_ERRORS.get(rc, 'quote3_error_t')} ({rc:#06x})"
            if rc in _QUOTE3_UNAVAILABLE:
                raise CollateralUnavailable(f"native QVL: {what}")
            if rc in _QUOTE3_BACKEND:
                raise ProviderError(f"native QVL: {what}")
            raise VerificationError("native_qvl", what)
        return QvlResult(_qv_result_status(result.value, "native QVL"), expiration.value)


# ---------------------------------------------------------------------------------------------------
# detection and selection
# ---------------------------------------------------------------------------------------------------


def _is_occlum(device: str, environ: Mapping[str, str]) -> bool:
    """Occlum's LibOS shows /dev/sgx as a character device and sets OCCLUM=yes by default.

    On a host, SGX drivers make /dev/sgx a directory (/dev/sgx/enclave, /dev/sgx/provision), so a
    directory never counts.  A regular file only counts with OCCLUM=yes (what tests stand in with).
    """
    try:
        st = os.stat(device)
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    return stat.S_ISCHR(st.st_mode) or environ.get("OCCLUM") == "yes"


def detect_provider(*, occlum_device: str = OCCLUM_DEVICE, gramine_root: str = GRAMINE_ROOT,
                    environ: Mapping[str, str] | None = None) -> str | None:
    """'occlum', 'gramine' or None: which enclave runtime this process is running in."""
    env = os.environ if environ is None else environ
    if _is_occlum(str(occlum_device), env):
        return "occlum"
    if os.path.exists(os.path.join(gramine_root, "quote")):
        return "gramine"
    return None


_OCCLUM_OPTIONS = frozenset({"device", "ioctl"})
_GRAMINE_OPTIONS = frozenset({"root"})
PROVIDER_NAMES = ("occlum", "gramine", "sim")


def get_provider(name: str | None = None, **options: Any) -> Any:
    """The quote provider called `name`, or the one detected when name is None.

    Options go to the provider: occlum (device, ioctl), gramine (root), sim (sgxsim.SimProvider's).
    With name None, `device`/`root` also steer detection and `environ` replaces os.environ for it.
    """
    if name is None:
        environ = options.pop("environ", None)
        unknown = set(options) - _OCCLUM_OPTIONS - _GRAMINE_OPTIONS
        if unknown:
            raise ProviderError(f"unknown provider option(s) for detection: "
                                     f"{', '.join(sorted(unknown))}")
        device = str(options.get("device", OCCLUM_DEVICE))
        root = str(options.get("root", GRAMINE_ROOT))
        name = detect_provider(occlum_device=device, gramine_root=root, environ=environ)
        if name is None:
            raise ProviderError(
                f"no SGX quote provider detected: looked for Occlum ({device} as a character device, "
                f"or with OCCLUM=yes) and Gramine ({os.path.join(root, 'quote')}); "
                "name one explicitly, e.g. 'sim' for the simulated platform")
        allowed = _OCCLUM_OPTIONS if name == "occlum" else _GRAMINE_OPTIONS
        options = {k: v for k, v in options.items() if k in allowed}
    if name == "occlum":
        _reject_options(options, _OCCLUM_OPTIONS, name)
        return OcclumProvider(**options)
    if name == "gramine":
        _reject_options(options, _GRAMINE_OPTIONS, name)
        return GramineProvider(**options)
    if name == "sim":
        import sgxsim

        try:
            return sgxsim.SimProvider(**options)
        except TypeError as exc:
            raise ProviderError(f"sim provider: {exc}") from None
    raise ProviderError(f"unknown quote provider {name!r} (choose one of {', '.join(PROVIDER_NAMES)})")


def _reject_options(options: Mapping[str, Any], allowed: frozenset[str], name: str) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ProviderError(f"{name} provider: unknown option(s) {', '.join(sorted(unknown))} "
                              f"(accepted: {', '.join(sorted(allowed))})")


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def _hex_arg(value: str, size: int | None, name: str) -> bytes:
    try:
        b = bytes.fromhex(value)
    except ValueError:
        raise DcapError(f"{name}: not hex") from None
    if size is not None and len(b) != size:
        raise DcapError(f"{name}: must be {size} bytes ({2 * size} hex digits)")
    return b


def _read_quote_file(path: str) -> bytes:
    """A quote file holds raw bytes, or hex text (as many tools print quotes)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DcapError(f"quote {path}: cannot read ({exc.strerror})") from None
    text = data.strip()
    if text and len(text) % 2 == 0 and re.fullmatch(rb"[0-9a-fA-F]+", text):
        return bytes.fromhex(text.decode())
    return data


def _cmd_sim_init(args: argparse.Namespace) -> int:
    import sgxsim

    plat = sgxsim.SimPlatform.init(args.dir)
    print(f"root CA:    {plat.directory / 'root_ca.pem'}")
    print(f"collateral: {plat.directory / 'collateral.json'}")
    return 0


def _cmd_quote(args: argparse.Namespace) -> int:
    report_data = _hex_arg(args.report_data, None, "--report-data")
    if len(report_data) > 64:
        raise DcapError("--report-data: at most 64 bytes")
    report_data = report_data.ljust(64, b"\0")
    options: dict[str, object] = {}
    if args.provider == "sim":
        options["sim_dir"] = args.sim_dir
        if args.mr_enclave:
            options["mr_enclave"] = _hex_arg(args.mr_enclave, 32, "--mr-enclave")
        if args.mr_signer:
            options["mr_signer"] = _hex_arg(args.mr_signer, 32, "--mr-signer")
        options.update(isv_prod_id=args.isv_prod_id, isv_svn=args.isv_svn, debug=args.debug, tcb=args.tcb)
    elif args.mr_enclave or args.mr_signer or args.debug:
        raise DcapError("--mr-enclave/--mr-signer/--debug only apply to the sim provider")
    provider = get_provider(args.provider, **options)
    quote = provider.get_quote(report_data)
    if args.output:
        out = Path(args.output)
        out.write_bytes(quote)
        print(f"quote:      {out} ({len(quote)} bytes, provider {provider.name})")
        if args.provider == "sim":
            coll = out.with_name(out.name + ".collateral.json")
            coll.write_text(provider.platform.collateral().to_json())  # type: ignore[attr-defined]
            print(f"collateral: {coll}")
            print(f"root CA:    {Path(args.sim_dir) / 'root_ca.pem'}")
    else:
        print(quote.hex())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    quote = _read_quote_file(args.quote)
    root = load_root_ca(args.root_ca)
    source = open_collateral_source(args.collateral, args.pccs)
    result = Verifier(source, root_ca=root).verify(quote, now=args.now)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        d = result.to_dict()
        for key in ("status", "advisory_ids", "mr_enclave", "mr_signer", "isv_prod_id", "isv_svn", "debug",
                    "report_data", "fmspc", "collateral_expiry"):
            value = ", ".join(d[key]) if key == "advisory_ids" else d[key]  # type: ignore[arg-type]
            print(f"{key}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcap.py",
                                     description="SGX DCAP quotes: simulate, generate, verify.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sim-init", help="create (or reuse) a simulated SGX platform in DIR")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_sim_init)
    p = sub.add_parser("quote", help="generate a quote for report data")
    p.add_argument("--provider", choices=("sim", "occlum", "gramine"), default=None,
                   help="default: detect (occlum, then gramine)")
    p.add_argument("--report-data", required=True, help="hex, up to 64 bytes (zero-padded)")
    p.add_argument("--sim-dir", default="sim")
    p.add_argument("--mr-enclave")
    p.add_argument("--mr-signer")
    p.add_argument("--isv-prod-id", type=int, default=0)
    p.add_argument("--isv-svn", type=int, default=0)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--tcb", default="UpToDate", help="sim platform TCB level, e.g. OutOfDate")
    p.add_argument("-o", "--output", help="write the quote here (default: hex on stdout)")
    p.set_defaults(func=_cmd_quote)
    p = sub.add_parser("verify", help="verify a quote; exit 0 only when genuine")
    p.add_argument("quote", help="quote file (raw bytes or hex)")
    p.add_argument("--collateral", help="collateral bundle (JSON, dcap-qvl QuoteCollateralV3 shape)")
    p.add_argument("--pccs", help="PCS/PCCS base URL (v4 API)")
    p.add_argument("--root-ca", help="trusted root (DER or PEM); default: the shipped Intel SGX Root CA")
    p.add_argument("--now", type=int, help="verification time, unix seconds (default: now)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_cmd_verify)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DcapError as exc:
        print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
