"""The DCAP collateral bundle: Intel's verification collateral for a quote as one value (and its JSON).

Who may import it: the tenant side (dcap verifies it, pccs fetches it, native_qvl hands it to
Intel's library) and the simulated platform (sgxsim signs it).  Never the enclave side.  It holds
the data and its text encodings only: no signature, chain or date is checked here (that is dcap).

Malformed collateral raises CollateralError; collateral that cannot be had right now (PCCS down, a
file missing) CollateralUnavailable.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from dcap_quote import DcapError


class CollateralError(DcapError):
    """Malformed collateral (JSON, CRL DER, certificates, TCB info / QE identity fields)."""


class CollateralUnavailable(DcapError):
    """PCCS/PCS unreachable or answering with a server error; retrying later may help."""


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
        return cls.from_dict(parse_json(text, "collateral"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def parse_json(text: str | bytes, piece: str) -> object:
    """json.loads for every JSON entry point (collateral bundle, TCB info, QE identity, PCCS bodies):
    whatever the text, only CollateralError.  Besides syntax errors (ValueError), json raises
    UnicodeDecodeError on bytes that are not UTF-8, ValueError on integers beyond int's digit limit,
    and RecursionError on nesting deeper than the interpreter's stack ("[" * 100000)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise CollateralError(f"{piece}: not valid JSON ({reason})") from None


def utf8(text: str, piece: str) -> bytes:
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



def crl_der(data: bytes) -> bytes:
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


def unix_now(now: int | None) -> int:
    """`now` as whole unix seconds; None is the current time (every `now=` parameter means this)."""
    return int(time.time()) if now is None else int(now)


def iso_date(ts: int) -> str:
    """Unix seconds as the UTC date collateral uses ("2025-06-19T10:56:11Z"), for messages."""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"unix {ts}"
