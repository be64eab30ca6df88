"""Quote providers for real enclaves (Occlum, Gramine) and Intel's native QVL as a verifier backend.

TEMPORARY module: the lead pastes it after dcap.py's own definitions.  It therefore never imports
dcap at module level; the one place that reaches into dcap is `_dcap()` (when inlined, it returns
this module instead).  Nothing here can be exercised against real SGX on a machine without it, so
every OS boundary is injectable: the ioctl function, the device and pseudo-file paths, the shared
library path, the environment used for detection.  Tests drive those boundaries with real bytes.

Every failure leaves as a dcap error (ProviderError for quote generation and for the native library
itself, VerificationError / CollateralUnavailable for what the native QVL says about a quote); no
OSError escapes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

REPORT_DATA_SIZE = 64  # sizeof(sgx_report_data_t)
# Header (48) + report body (384) + signature_data length (4): no quote can be shorter.
MIN_QUOTE_SIZE = 48 + 384 + 4
# A DCAP quote with its PCK chain is ~5 KiB; a size beyond this is a broken driver, not a quote.
MAX_QUOTE_SIZE = 1 << 20

OCCLUM_DEVICE = "/dev/sgx"
GRAMINE_ROOT = "/dev/attestation"
NATIVE_QVL_LIB = "libsgx_dcap_quoteverify.so.1"

IoctlFn = Callable[[int, int, Any], Any]


def _dcap() -> ModuleType:
    """The module holding the error classes and parse_quote (dcap itself once this code is inlined)."""
    import dcap

    return dcap


def _provider_error(message: str) -> Exception:
    return _dcap().ProviderError(message)


def _os_reason(exc: OSError) -> str:
    """'ENOENT (No such file or directory)': the errno name is what people search for."""
    name = errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")
    return f"{name} ({exc.strerror or exc})"


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes | bytearray | memoryview):
        raise _provider_error("report_data must be bytes")
    report_data = bytes(report_data)
    if len(report_data) != REPORT_DATA_SIZE:
        raise _provider_error(f"report_data must be exactly {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    return report_data


def _check_quote(quote: bytes, report_data: bytes, source: str) -> bytes:
    """A provider's output is only a quote if it parses and carries the report_data we asked for.

    Catching this here turns a confused driver (short read, stale user_report_data, wrong buffer)
    into a clear local error instead of a verification failure on the far side.
    """
    dcap = _dcap()
    if len(quote) < MIN_QUOTE_SIZE:
        raise dcap.ProviderError(f"{source} returned a short quote: {len(quote)} bytes "
                                 f"(a quote has at least {MIN_QUOTE_SIZE})")
    try:
        parsed = dcap.parse_quote(quote)
    except dcap.QuoteError as exc:
        raise dcap.ProviderError(f"{source} returned a malformed quote: {exc}") from None
    if parsed.report.report_data != report_data:
        raise dcap.ProviderError(f"{source} returned a quote for different report_data "
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
            raise _provider_error(f"occlum: {arg.__name__} is {ctypes.sizeof(arg)} bytes here, the ioctl "
                                  f"expects {ioc_size(request)} (Occlum runs on x86_64 only)")


class QvlResult(NamedTuple):
    """What Intel's verifier (native QVL, or Occlum's in-enclave ioctl) says about a quote."""

    status: str  # one of dcap.TCB_STATUSES
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
            raise _provider_error(f"occlum: cannot open {self.device}: {_os_reason(exc)}") from None
        try:
            self._ioctl(fd, request, arg)
        except OSError as exc:
            raise _provider_error(f"occlum: ioctl {label} on {self.device} failed: "
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
            raise _provider_error(f"occlum: GET_DCAP_QUOTE_SIZE reported an implausible quote size {size}")
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
            raise _provider_error(f"occlum: GEN_DCAP_QUOTE reported {size_io.value} bytes, "
                                  f"more than the {size}-byte buffer")
        return _check_quote(buf.raw[: size_io.value], report_data, "occlum GEN_DCAP_QUOTE")

    def supplemental_data_size(self) -> int:
        size = self._u32(SGXIOC_GET_DCAP_SUPPLEMENTAL_SIZE, "GET_DCAP_SUPPLEMENTAL_SIZE")
        if size > MAX_QUOTE_SIZE:
            raise _provider_error(f"occlum: implausible supplemental data size {size}")
        return size

    def verify_quote(self, quote: bytes) -> QvlResult:
        """Intel's verifier as Occlum runs it for the enclave (collateral from the host's PCCS config)."""
        quote = bytes(quote)
        if not quote:
            raise _provider_error("occlum: empty quote")
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
            raise _provider_error(f"gramine: cannot read {path}: {_os_reason(exc)}") from None
        return raw.rstrip(b"\0\n ").decode("ascii", "replace")

    def get_quote(self, report_data: bytes) -> bytes:
        report_data = _check_report_data(report_data)
        kind = self.attestation_type()
        if kind != "dcap":
            raise _provider_error(f"gramine: attestation_type is {kind!r}, need 'dcap' "
                                  "(set sgx.remote_attestation = \"dcap\" in the manifest)")
        urd = self.root / "user_report_data"
        try:
            fd = os.open(urd, os.O_WRONLY)
            try:
                written = os.write(fd, report_data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _provider_error(f"gramine: cannot write {urd}: {_os_reason(exc)}") from None
        if written != REPORT_DATA_SIZE:
            raise _provider_error(f"gramine: short write to {urd}: {written} of {REPORT_DATA_SIZE} bytes")
        qpath = self.root / "quote"
        try:
            quote = qpath.read_bytes()
        except OSError as exc:
            raise _provider_error(f"gramine: cannot read {qpath}: {_os_reason(exc)}") from None
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
    raise _dcap().VerificationError("native_qvl_result", f"{source}: {name} ({value:#06x})")


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
        "pck_crl_issuer_chain": collateral.pck_crl_issuer_chain.encode() + b"\0",
        "root_ca_crl": collateral.root_ca_crl.hex().encode() + b"\0",
        "pck_crl": collateral.pck_crl.hex().encode() + b"\0",
        "tcb_info_issuer_chain": collateral.tcb_info_issuer_chain.encode() + b"\0",
        "tcb_info": f'{{"tcbInfo":{collateral.tcb_info},"signature":"{tcb_sig}"}}'.encode() + b"\0",
        "qe_identity_issuer_chain": collateral.qe_identity_issuer_chain.encode() + b"\0",
        "qe_identity": (f'{{"enclaveIdentity":{collateral.qe_identity},"signature":"{qe_sig}"}}'.encode()
                        + b"\0"),
    }


def _load_qvl(lib: str) -> ctypes.CDLL:
    """dlopen the library and declare the two prototypes (sgx_dcap_quoteverify.h)."""
    try:
        handle = ctypes.CDLL(lib)
        size_fn = handle.sgx_qv_get_quote_supplemental_data_size
        verify_fn = handle.sgx_qv_verify_quote
    except (OSError, AttributeError) as exc:
        raise _provider_error(f"native QVL: cannot load {lib}: {exc}") from None
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
            raise _provider_error(f"native QVL: sgx_qv_get_quote_supplemental_data_size returned "
                                  f"{QUOTE3_ERRORS.get(rc, 'error')} ({rc:#06x})")
        if size.value > MAX_QUOTE_SIZE:
            raise _provider_error(f"native QVL: implausible supplemental data size {size.value}")
        return size.value

    def verify(self, quote: bytes, *, now: int | None = None, collateral: Any = None) -> QvlResult:
        """Verify `quote` at `now` (default: the current time).

        `collateral` (a dcap.Collateral) is passed to the library as sgx_ql_qve_collateral_t; None lets
        the library fetch it through its own QPL configuration (/etc/sgx_default_qcnl.conf).
        """
        dcap = _dcap()
        quote = bytes(quote)
        if not quote or len(quote) > 0xFFFFFFFF:
            raise dcap.ProviderError(f"native QVL: quote size {len(quote)} not representable")
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
                raise dcap.CollateralUnavailable(f"native QVL: {what}")
            if rc in _QUOTE3_BACKEND:
                raise dcap.ProviderError(f"native QVL: {what}")
            raise dcap.VerificationError("native_qvl", what)
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
    dcap = _dcap()
    if name is None:
        environ = options.pop("environ", None)
        unknown = set(options) - _OCCLUM_OPTIONS - _GRAMINE_OPTIONS
        if unknown:
            raise dcap.ProviderError(f"unknown provider option(s) for detection: "
                                     f"{', '.join(sorted(unknown))}")
        device = str(options.get("device", OCCLUM_DEVICE))
        root = str(options.get("root", GRAMINE_ROOT))
        name = detect_provider(occlum_device=device, gramine_root=root, environ=environ)
        if name is None:
            raise dcap.ProviderError(
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
            raise dcap.ProviderError(f"sim provider: {exc}") from None
    raise dcap.ProviderError(f"unknown quote provider {name!r} (choose one of {', '.join(PROVIDER_NAMES)})")


def _reject_options(options: Mapping[str, Any], allowed: frozenset[str], name: str) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise _provider_error(f"{name} provider: unknown option(s) {', '.join(sorted(unknown))} "
                              f"(accepted: {', '.join(sorted(allowed))})")
