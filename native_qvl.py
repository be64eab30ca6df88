"""Intel's own quote verifier as an optional backend: libsgx_dcap_quoteverify through ctypes (QVL mode),
or Occlum's in-enclave VER_DCAP_QUOTE ioctl, both answering in sgx_ql_qv_result_t.

Who may import it: the tenant side (to cross-check or replace the pure-Python verifier) and tests.
Never the enclave side's client: asps_client does not verify quotes.  A result that denies
genuineness is a dcap.VerificationError; a library or platform failure a ProviderError; PCCS
trouble CollateralUnavailable.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any, NamedTuple

from attester import MAX_QUOTE_SIZE, OcclumProvider, check_ioctl_layouts
from dcap import VerificationError
from dcap_collateral import CollateralUnavailable, utf8
from dcap_quote import ProviderError

NATIVE_QVL_LIB = "libsgx_dcap_quoteverify.so.1"

class QvlResult(NamedTuple):
    """What Intel's verifier (native QVL, or Occlum's in-enclave ioctl) says about a quote."""

    status: str  # one of TCB_STATUSES
    collateral_expiration_status: int  # 0: all collateral valid at the check date


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
        "pck_crl_issuer_chain": utf8(collateral.pck_crl_issuer_chain, "pck_crl_issuer_chain") + b"\0",
        "root_ca_crl": collateral.root_ca_crl.hex().encode() + b"\0",
        "pck_crl": collateral.pck_crl.hex().encode() + b"\0",
        "tcb_info_issuer_chain": utf8(collateral.tcb_info_issuer_chain, "tcb_info_issuer_chain") + b"\0",
        "tcb_info": utf8(f'{{"tcbInfo":{collateral.tcb_info},"signature":"{tcb_sig}"}}', "tcb_info") + b"\0",
        "qe_identity_issuer_chain": (utf8(collateral.qe_identity_issuer_chain, "qe_identity_issuer_chain")
                                     + b"\0"),
        "qe_identity": (utf8(f'{{"enclaveIdentity":{collateral.qe_identity},"signature":"{qe_sig}"}}',
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
# Occlum: Intel's verifier run by the LibOS for the enclave (/dev/sgx VER_DCAP_QUOTE)
# ---------------------------------------------------------------------------------------------------

SGXIOC_GET_DCAP_SUPPLEMENTAL_SIZE = 0x80047309  # _IOR('s', 9, uint32_t)
SGXIOC_VER_DCAP_QUOTE = 0xC030730A  # _IOWR('s', 10, IoctlVerDCAPQuoteArg)


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


class OcclumQvl(OcclumProvider):
    """An Occlum provider that can also verify quotes through the LibOS (collateral from the host's
    PCCS configuration).  Only for a verifier that itself runs in Occlum; the client never needs it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_ioctl_layouts((VerDcapQuoteArg, SGXIOC_VER_DCAP_QUOTE))
        super().__init__(*args, **kwargs)

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
