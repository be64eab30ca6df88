"""DCAP quote format (SGX and TDX): header, SGX report body or TD report, certification data; parse
and serialize, nothing more.

Who may import it: anyone.  It is the one module the enclave side (attester, ratls_attest), the
verifier (dcap), RA-TLS reading (ratls) and the simulated platform (sgxsim) share, so it imports no
other project module and knows nothing about collateral, certificates or verification.

Malformed quote bytes raise QuoteError, and nothing else.  The error base DcapError and
ProviderError (quote generation failed) live here too, so the enclave side and the simulator raise
the very classes the tenant side catches without importing the verifier.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------------
# errors and constants
# ---------------------------------------------------------------------------------------------------


class DcapError(Exception):
    """Base of every error the DCAP modules (dcap_quote, dcap_collateral, dcap, pccs, attester,
    native_qvl) raise on purpose."""


class QuoteError(DcapError):
    """Malformed quote bytes; the message names the field.  The only error parse_quote raises."""


class ProviderError(DcapError):
    """Quote generation failed (no SGX device, driver error, bad report data).  Raised by the
    attester's providers and the simulated one alike; documented as attester.ProviderError."""


SGX_QUOTE_V3 = 3
SGX_QUOTE_V4 = 4
QUOTE_V5 = 5
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

HEADER_LEN = 48
REPORT_BODY_LEN = 384
TD_REPORT10_LEN = 584
TD_REPORT15_LEN = 648
# Quote v5 body descriptor: u16 type, u32 size, between the header and the body (Intel QVL
# QuoteConstants.h / Quote.cpp).
BODY_DESCRIPTOR_LEN = 6
BODY_SGX_ENCLAVE_REPORT = 1
BODY_TD_REPORT10 = 2
BODY_TD_REPORT15 = 3
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

_TD_LAYOUT = (
    # (field, size) in wire order (Intel TDX Module ABI, TDREPORT's TDINFO + TEE_TCB_INFO as quoted).
    ("tee_tcb_svn", 16), ("mr_seam", 48), ("mr_signer_seam", 48), ("seam_attributes", 8),
    ("td_attributes", 8), ("xfam", 8), ("mr_td", 48), ("mr_config_id", 48), ("mr_owner", 48),
    ("mr_owner_config", 48), ("rtmr0", 48), ("rtmr1", 48), ("rtmr2", 48), ("rtmr3", 48),
    ("report_data", 64),
)
_TD15_LAYOUT = (("tee_tcb_svn_2", 16), ("mr_service_td", 48))
assert sum(n for _, n in _TD_LAYOUT) == TD_REPORT10_LEN
assert TD_REPORT10_LEN + sum(n for _, n in _TD15_LAYOUT) == TD_REPORT15_LEN


@dataclass(frozen=True, slots=True)
class TdReport:
    """A TD report as quoted: 1.0 (584 bytes) or, with `tee_tcb_svn_2` and `mr_service_td`, 1.5
    (648 bytes, quote v5 body type 3).  Every field is raw bytes, as on the wire."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn_2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def is_v15(self) -> bool:
        return self.tee_tcb_svn_2 is not None

    @property
    def size(self) -> int:
        return TD_REPORT15_LEN if self.is_v15 else TD_REPORT10_LEN

    @property
    def body_type(self) -> int:
        """Quote v5 body type: 3 for a TD report 1.5, 2 for 1.0."""
        return BODY_TD_REPORT15 if self.is_v15 else BODY_TD_REPORT10

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES.TUD.DEBUG (bit 0): the host VMM can read and change the TD's state."""
        return bool(self.td_attributes[0] & 0x01)

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def tdx_module_version(self) -> tuple[int, int]:
        """(major, minor) of the TDX module: tee_tcb_svn bytes 1 and 0 (Intel QVL TdxModuleCheck)."""
        return self.tee_tcb_svn[1], self.tee_tcb_svn[0]

    def _layout(self) -> tuple[tuple[str, int], ...]:
        return _TD_LAYOUT + _TD15_LAYOUT if self.is_v15 else _TD_LAYOUT

    def to_bytes(self) -> bytes:
        if (self.tee_tcb_svn_2 is None) != (self.mr_service_td is None):
            raise QuoteError("td_report: tee_tcb_svn_2 and mr_service_td come together (TD report 1.5)")
        out = []
        for name, size in self._layout():
            value = getattr(self, name)
            _fixed(value, size, f"td_report.{name}")
            out.append(bytes(value))
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "td_report") -> TdReport:
        if len(data) not in (TD_REPORT10_LEN, TD_REPORT15_LEN):
            raise QuoteError(f"{name}: must be {TD_REPORT10_LEN} or {TD_REPORT15_LEN} bytes, got {len(data)}")
        data = bytes(data)
        layout = _TD_LAYOUT + _TD15_LAYOUT if len(data) == TD_REPORT15_LEN else _TD_LAYOUT
        values, pos = [], 0
        for _, size in layout:
            values.append(data[pos:pos + size])
            pos += size
        return cls(*values)

    def to_dict(self) -> dict[str, str]:
        """Every field as hex (how the CLI and the differential tests show a TD's identity)."""
        return {name: getattr(self, name).hex() for name, _ in self._layout()}


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
        """Signature data as it appears after the 4-byte length in a quote of `version` (v4 and v5
        carry the QE part inside type-6 certification data)."""
        head = self.isv_signature + self.attestation_key
        if version >= SGX_QUOTE_V4:
            return head + CertificationData(CERT_QE_REPORT, self._qe_part()).to_bytes()
        return head + self._qe_part()


@dataclass(frozen=True, slots=True)
class Quote:
    """A parsed DCAP ECDSA quote; `raw` keeps the exact bytes it was parsed from.

    `report` is the SGX enclave's ReportBody (tee_type 0) or the TD's TdReport (tee_type 0x81).
    `padding` counts the zero bytes after the signature data (a fixed-size buffer from configfs-tsm or
    a QGS); they are not signed and not part of the quote, but to_bytes() writes them back so parsing
    and serializing stay exact inverses."""

    header: QuoteHeader
    report: ReportBody | TdReport
    signature: QuoteSignatureData
    raw: bytes = field(default=b"", repr=False, compare=False)
    padding: int = 0

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def is_td(self) -> bool:
        return isinstance(self.report, TdReport)

    @property
    def body_type(self) -> int:
        """The v5 body type this report has (1 SGX, 2 TD 1.0, 3 TD 1.5), whatever the version."""
        return self.report.body_type if isinstance(self.report, TdReport) else BODY_SGX_ENCLAVE_REPORT

    @property
    def signed_length(self) -> int:
        """Length of header (|| v5 body descriptor) || body: what the attestation key signs."""
        body = self.report.size if isinstance(self.report, TdReport) else REPORT_BODY_LEN
        return HEADER_LEN + (BODY_DESCRIPTOR_LEN if self.version == QUOTE_V5 else 0) + body

    def _signed(self) -> bytes:
        out = self.header.to_bytes()
        if self.version == QUOTE_V5:
            size = self.report.size if isinstance(self.report, TdReport) else REPORT_BODY_LEN
            out += struct.pack("<HI", self.body_type, size)
        return out + self.report.to_bytes()

    @property
    def signed_bytes(self) -> bytes:
        """Header (|| v5 body descriptor) || body: the bytes the attestation key signs."""
        if self.raw:
            return self.raw[:self.signed_length]
        return self._signed()

    def to_bytes(self) -> bytes:
        sig = self.signature.to_bytes(self.header.version)
        return self._signed() + struct.pack("<I", len(sig)) + sig + bytes(self.padding)


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


def _read_body(r: _Reader, header: QuoteHeader) -> ReportBody | TdReport:
    """The report after the header: by TEE type for v3/v4, by the body descriptor for v5."""
    if header.version == QUOTE_V5:
        btype = r.u16("body.type")
        size = r.u32("body.size")
        want = {BODY_SGX_ENCLAVE_REPORT: (TEE_SGX, REPORT_BODY_LEN),
                BODY_TD_REPORT10: (TEE_TDX, TD_REPORT10_LEN),
                BODY_TD_REPORT15: (TEE_TDX, TD_REPORT15_LEN)}.get(btype)
        if want is None:
            raise QuoteError(f"body.type: unsupported body type {btype} "
                             "(1 SGX, 2 TD report 1.0, 3 TD report 1.5)")
        if want[0] != header.tee_type:
            raise QuoteError(f"body.type: body type {btype} does not go with TEE type {header.tee_type:#x}")
        if size != want[1]:
            raise QuoteError(f"body.size: body type {btype} is {want[1]} bytes, declared {size}")
    elif header.tee_type == TEE_TDX:
        if header.version != SGX_QUOTE_V4:
            raise QuoteError(f"header.version: a TDX quote is version 4 or 5, not {header.version}")
        btype = BODY_TD_REPORT10
    else:
        btype = BODY_SGX_ENCLAVE_REPORT
    if btype == BODY_SGX_ENCLAVE_REPORT:
        return ReportBody.from_bytes(r.take(REPORT_BODY_LEN, "report"), "report")
    size = TD_REPORT10_LEN if btype == BODY_TD_REPORT10 else TD_REPORT15_LEN
    return TdReport.from_bytes(r.take(size, "td_report"), "td_report")


def parse_quote(data: bytes) -> Quote:
    """Parse a DCAP ECDSA-P256 quote: SGX v3, v4, v5; TDX v4, v5 (TD report 1.0 or 1.5).  Raises
    QuoteError only.

    Strict on purpose: every declared length must match exactly, and the only bytes allowed after the
    signature data are zeros (reported as `padding`), so `parse_quote(b).to_bytes() == b` holds for
    every accepted input.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise QuoteError("quote: must be bytes")
    data = bytes(data)
    r = _Reader(data)
    header = QuoteHeader.from_bytes(r.take(HEADER_LEN, "header"))
    if header.tee_type not in (TEE_SGX, TEE_TDX):
        raise QuoteError(f"header.tee_type: unsupported TEE type {header.tee_type:#x}")
    if header.version not in (SGX_QUOTE_V3, SGX_QUOTE_V4, QUOTE_V5):
        raise QuoteError(f"header.version: unsupported quote version {header.version}")
    if header.attestation_key_type != ATT_KEY_ECDSA_P256:
        raise QuoteError(f"header.attestation_key_type: unsupported attestation key type "
                         f"{header.attestation_key_type} (only ECDSA-256-with-P-256 = 2)")
    report = _read_body(r, header)
    sig_len = r.u32("signature_data.size")
    if sig_len > r.rest():
        raise QuoteError(f"signature_data.size: declares {sig_len} bytes but {r.rest()} follow")
    padding = r.rest() - sig_len
    if padding and data[r.pos + sig_len:].count(0) != padding:
        raise QuoteError(f"signature_data.size: declares {sig_len} bytes but {r.rest()} follow, and the "
                         f"{padding} bytes after it are not zero padding")
    r = _Reader(data[:len(data) - padding], r.pos)
    isv_sig = r.take(ECDSA_SIG_LEN, "signature_data.isv_signature")
    att_key = r.take(ECDSA_KEY_LEN, "signature_data.attestation_key")
    if header.version == SGX_QUOTE_V3:
        qe_report, qe_sig, auth, cert = _read_qe_part(r, "signature_data.")
    else:
        outer = _read_cert_data(r, "signature_data.certification_data")
        if outer.type != CERT_QE_REPORT:
            raise QuoteError(f"signature_data.certification_data.type: v{header.version} quote needs type 6 "
                             f"(QE report certification data), got {outer.type}")
        inner = _Reader(outer.data)
        qe_report, qe_sig, auth, cert = _read_qe_part(inner, "qe_report_certification_data.")
        if inner.rest():
            raise QuoteError(f"qe_report_certification_data: {inner.rest()} trailing bytes")
    if cert.type == CERT_QE_REPORT:
        raise QuoteError("certification_data.type: QE report certification data may not nest itself")
    if r.rest():
        raise QuoteError(f"signature_data: {r.rest()} trailing bytes after certification data")
    sig = QuoteSignatureData(isv_sig, att_key, qe_report, qe_sig, auth, cert)
    return Quote(header, report, sig, data, padding)
