"""A simulated SGX DCAP platform: a test PKI shaped like Intel's, signed collateral, and real quotes.

Who may import it: tests, benchmarks, the demo, and attester.get_provider("sim") (only when asked
for, never in an enclave).  It imports only the quote format (dcap_quote) and the collateral bundle
(dcap_collateral), and the X.509 library: never the verifier it exists to exercise.

FOR TESTS AND DEMOS ONLY.  Machines here have no SGX, yet every layer above the quote (RA-TLS, the
secret service, the appraisal) needs genuine-looking evidence to exercise its real code paths.  This
module generates, once per directory, an ECDSA P-256 certificate hierarchy laid out like Intel's
(root CA, PCK Platform/Processor CA, PCK leaf certificates carrying the Intel SGX extension, a TCB
signing certificate), CRLs, a TCB Info v3 and a QE Identity v2 signed the way Intel signs them, and
it signs quotes with real ECDSA keys.  Every subject says SIMULATED.  Nothing trusts this platform
unless its root (DIR/root_ca.pem) is named explicitly as the trusted root: the default trust anchor
everywhere is the Intel SGX Root CA, against which every quote made here fails.

Layout of a platform directory:
  root_ca.pem       the sim's root certificate (pass it as --root-ca / root_ca=)
  collateral.json   the collateral bundle (dcap-qvl QuoteCollateralV3 JSON shape, Processor CA)
  platform.json     private keys, certificates and platform constants (mode 0600; test material)

TCB levels: each name in TCB_LEVEL_NAMES has its own PCK leaf whose SVNs select exactly that level
of the sim's TCB info, so `make_quote(tcb="OutOfDate")` yields a quote a correct verifier rates
OutOfDate.  `BELOW_ALL_LEVELS` names a platform below every level (no TCB level matches).

A TD: `make_td_quote` signs TDX quotes (v4, v5 with TD report 1.0 or 1.5) on the same PCK chains,
judged by `tdx_collateral()` (TDX TCB info v3 with a TDX 1.0 `tdxModule` and a TDX_01 module identity,
and a TD QE identity).  Each TCB level also has TDX components (tee_tcb_svn[2] = the level's
generation), so `td_tcb=` picks the TDX level apart from the SGX one; `module_svn=` picks the TDX_01
module level (TDX_MODULE_LEVELS); `tee_tcb_svn_2=` on a 1.5 report reaches TDRelaunchAdvised.

Helpers for tests that need *bad* collateral (`sign_json`, `make_crl`, `build_collateral`,
`tcb_info_dict`, `qe_identity_dict`, `issue_pck_certificate`) produce real signatures by the sim's
keys, so a mutation tests the check it aims at instead of a parse error.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

import dcap_quote
from dcap_collateral import Collateral

# ---------------------------------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------------------------------

STATE_VERSION = 1
DAY = 86400
COLLATERAL_VALIDITY = 30 * DAY
# Re-sign stored collateral when it expires within this long, so a reused directory stays usable.
REFRESH_MARGIN = DAY
# Collateral is dated a little in the past so a verifier whose clock lags ours still accepts it.
BACKDATE = 3600

SGX_EXT_OID = "1.2.840.113741.1.13.1"
SIM_FMSPC = bytes.fromhex("00C0FFEE0000")
SIM_PCE_ID = bytes.fromhex("0000")
SGX_TYPE_STANDARD = 0
SGX_TYPE_SCALABLE = 1
TCB_EVALUATION_DATA_NUMBER = 17

# The sim's quoting enclave (its QE identity and QE reports must agree).
QE_MR_SIGNER = hashlib.sha256(b"ASPS SIMULATED quoting enclave signer").digest()
QE_MR_ENCLAVE = hashlib.sha256(b"ASPS SIMULATED quoting enclave").digest()
QE_ISV_PROD_ID = 1
QE_MISC_SELECT = 0
QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
QE_ATTRIBUTES_MASK = bytes.fromhex("FBFFFFFFFFFFFFFF0000000000000000")
QE_REPORT_ATTRIBUTES = bytes.fromhex("1100000000000000e700000000000000")  # flags INIT|MODE64BIT, xfrm
QE_SVN_UP_TO_DATE = 8
QE_AUTH_DATA = bytes(range(32))  # Intel's QE writes 32 bytes; dcap-qvl insists on that length

# Default enclave identity for quotes (tests override them).
DEFAULT_MR_ENCLAVE = hashlib.sha256(b"ASPS SIMULATED enclave").digest()
DEFAULT_MR_SIGNER = hashlib.sha256(b"ASPS SIMULATED enclave signer").digest()
# SGX attributes.flags: INIT (bit 0) | MODE64BIT (bit 2); DEBUG is bit 1.  xfrm = x87|SSE|AVX|...
DEFAULT_ATTRIBUTES = bytes.fromhex("0500000000000000e700000000000000")
DEBUG_FLAG = 0x02
DEFAULT_MR_TD = hashlib.sha384(b"ASPS SIMULATED TD").digest()
# TD_ATTRIBUTES: SEPT_VE_DISABLE (bit 28), as a Linux guest runs; TUD.DEBUG is bit 0
DEFAULT_TD_ATTRIBUTES = bytes.fromhex("0000001000000000")
TD_DEBUG_FLAG = 0x01

_O = "SIMULATED - ASPS test platform, not Intel"


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _O),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ])


# CNs keep Intel's phrases ("SGX Root CA", "SGX PCK Certificate", "SGX TCB Signing", "... CA") because
# Intel's QVL looks for them, and start with SIMULATED so no human mistakes them for Intel's.
ROOT_CN = "SIMULATED Intel SGX Root CA"
PROCESSOR_CA_CN = "SIMULATED Intel SGX PCK Processor CA"
PLATFORM_CA_CN = "SIMULATED Intel SGX PCK Platform CA"
PCK_CN = "SIMULATED Intel SGX PCK Certificate"
TCB_SIGNING_CN = "SIMULATED Intel SGX TCB Signing"
CRL_URL = {
    "root": "https://sim.invalid/sgx/certification/v4/rootcacrl",
    "processor": "https://sim.invalid/sgx/certification/v4/pckcrl?ca=processor&encoding=der",
    "platform": "https://sim.invalid/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
}
CA_KINDS = ("processor", "platform")


# ---------------------------------------------------------------------------------------------------
# TCB levels
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimTcbLevel:
    """One platform TCB level: the SVNs a PCK certificate carries and the status TCB info gives them."""

    name: str
    status: str
    sgx_svns: tuple[int, ...]
    pce_svn: int
    tcb_date: str
    advisory_ids: tuple[str, ...]

    @property
    def cpu_svn(self) -> bytes:
        return bytes(self.sgx_svns)


def _svns(gen: int, late: int = 3) -> tuple[int, ...]:
    # Component 0 carries the "generation": strictly decreasing down the list, so the levels sort the
    # way Intel orders them and a platform at level N never also satisfies an earlier level.
    return (gen, gen, late, late, 255, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)


TCB_LEVELS: tuple[SimTcbLevel, ...] = (
    SimTcbLevel("UpToDate", "UpToDate", _svns(20), 13, "2025-05-14T00:00:00Z", ()),
    SimTcbLevel("SWHardeningNeeded", "SWHardeningNeeded", _svns(19), 13, "2025-02-12T00:00:00Z",
                ("INTEL-SA-00615",)),
    SimTcbLevel("ConfigurationNeeded", "ConfigurationNeeded", _svns(18), 13, "2024-11-13T00:00:00Z",
                ("INTEL-SA-00289",)),
    SimTcbLevel("ConfigurationAndSWHardeningNeeded", "ConfigurationAndSWHardeningNeeded", _svns(17), 13,
                "2024-08-14T00:00:00Z", ("INTEL-SA-00289", "INTEL-SA-00615")),
    SimTcbLevel("OutOfDate", "OutOfDate", _svns(16), 12, "2024-03-13T00:00:00Z",
                ("INTEL-SA-00828", "INTEL-SA-00615")),
    SimTcbLevel("OutOfDateConfigurationNeeded", "OutOfDateConfigurationNeeded", _svns(15), 12,
                "2023-08-08T00:00:00Z", ("INTEL-SA-00289", "INTEL-SA-00828", "INTEL-SA-00615")),
    SimTcbLevel("Revoked", "Revoked", _svns(14), 11, "2022-11-09T00:00:00Z",
                ("INTEL-SA-00233", "INTEL-SA-00289", "INTEL-SA-00828", "INTEL-SA-00615")),
)
TCB_LEVEL_NAMES = tuple(level.name for level in TCB_LEVELS)
# A platform older than every level in TCB info: verifiers must refuse it (TCB not supported).
BELOW_ALL_LEVELS = "BelowAllLevels"
_BELOW = SimTcbLevel(BELOW_ALL_LEVELS, "", _svns(2, 1), 5, "", ())
PLATFORMS: dict[str, SimTcbLevel] = {level.name: level for level in (*TCB_LEVELS, _BELOW)}


@dataclass(frozen=True)
class SimIsvLevel:
    """A QE or TDX module TCB level: an ISV SVN at least ``isv_svn`` has ``status``."""

    isv_svn: int
    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...]


SimQeLevel = SimIsvLevel


QE_TCB_LEVELS: tuple[SimQeLevel, ...] = (
    SimQeLevel(QE_SVN_UP_TO_DATE, "2024-03-13T00:00:00Z", "UpToDate", ()),
    SimQeLevel(6, "2021-11-10T00:00:00Z", "OutOfDate", ("INTEL-SA-00615",)),
    SimQeLevel(2, "2019-05-15T00:00:00Z", "Revoked", ("INTEL-SA-00219", "INTEL-SA-00615")),
)

# TDX: the TD QE (same signer as the QE, its own product id), the SEAM module signer, module levels.
TD_QE_ISV_PROD_ID = 2
TDX_MODULE_MR_SIGNER = bytes(48)          # Intel's TDX modules are signed by MRSIGNER_SEAM = 0
TDX_MODULE_MAJOR = 1                      # tee_tcb_svn[1]: module identity TDX_01


SimModuleLevel = SimIsvLevel


TDX_MODULE_LEVELS: tuple[SimModuleLevel, ...] = (
    SimModuleLevel(6, "2024-11-13T00:00:00Z", "UpToDate", ()),
    SimModuleLevel(4, "2024-03-13T00:00:00Z", "OutOfDate", ("INTEL-SA-01036",)),
    SimModuleLevel(2, "2023-08-09T00:00:00Z", "Revoked", ("INTEL-SA-01036", "INTEL-SA-01099")),
)
TDX_MODULE_SVN_UP_TO_DATE = TDX_MODULE_LEVELS[0].isv_svn


def _level_entry(tcb: dict[str, Any], level: SimTcbLevel | SimIsvLevel) -> dict[str, Any]:
    """One entry of a tcbLevels list, in Intel's key order: tcb, tcbDate, tcbStatus, advisoryIDs (if any)."""
    entry: dict[str, Any] = {"tcb": tcb, "tcbDate": level.tcb_date, "tcbStatus": level.status}
    if level.advisory_ids:
        entry["advisoryIDs"] = list(level.advisory_ids)
    return entry


def _tdx_gen(level: SimTcbLevel) -> int:
    """The TDX component (tee_tcb_svn[2]) of a level: its SGX generation (component 0)."""
    return level.sgx_svns[0]


def _tdx_svns(level: SimTcbLevel) -> tuple[int, ...]:
    # bytes 0, 1: module SVN and major version (judged by the module identity when the major is > 0)
    return (2, 0, _tdx_gen(level), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------------------------------------------
# a tiny DER encoder (enough for the Intel SGX extension)
# ---------------------------------------------------------------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def der_seq(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def _twos(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative integers are not needed here")
    return n.to_bytes(n.bit_length() // 8 + 1, "big")  # leading 0x00 when the top bit is set


def der_int(n: int) -> bytes:
    return _der(0x02, _twos(n))


def der_enum(n: int) -> bytes:
    return _der(0x0A, _twos(n))


def der_octets(b: bytes) -> bytes:
    return _der(0x04, b)


def der_bool(v: bool) -> bytes:
    return _der(0x01, b"\xff" if v else b"\x00")


def sgx_extension_value(*, ppid: bytes, sgx_svns: Iterable[int], pce_svn: int,
                        cpu_svn: bytes | None = None, pce_id: bytes = SIM_PCE_ID, fmspc: bytes = SIM_FMSPC,
                        sgx_type: int = SGX_TYPE_STANDARD, platform_instance_id: bytes | None = None,
                        configuration: tuple[bool, bool, bool] | None = None) -> bytes:
    """DER of the Intel SGX extension (OID 1.2.840.113741.1.13.1): a SEQUENCE of (OID, value) pairs.

    Layout as in real PCK certificates: PPID .1 (16-byte OCTET STRING); TCB .2, itself a SEQUENCE of
    (OID .2.1-.2.16, INTEGER comp SVN), (.2.17, INTEGER PCESVN), (.2.18, 16-byte OCTET STRING CPUSVN);
    PCE-ID .3 (2 bytes); FMSPC .4 (6 bytes); SGX type .5 (ENUMERATED).  Platform-CA certificates add
    PlatformInstanceID .6 (16 bytes) and Configuration .7 (dynamicPlatform, cachedKeys, smtEnabled).
    """
    svns = list(sgx_svns)
    if len(svns) != 16:
        raise ValueError("sgx_svns: need 16 component SVNs")
    base = SGX_EXT_OID
    tcb_items = [der_seq(der_oid(f"{base}.2.{i + 1}"), der_int(svn)) for i, svn in enumerate(svns)]
    tcb_items.append(der_seq(der_oid(f"{base}.2.17"), der_int(pce_svn)))
    cpu = cpu_svn if cpu_svn is not None else bytes(svns)
    tcb_items.append(der_seq(der_oid(f"{base}.2.18"), der_octets(cpu)))
    items = [
        der_seq(der_oid(f"{base}.1"), der_octets(ppid)),
        der_seq(der_oid(f"{base}.2"), der_seq(*tcb_items)),
        der_seq(der_oid(f"{base}.3"), der_octets(pce_id)),
        der_seq(der_oid(f"{base}.4"), der_octets(fmspc)),
        der_seq(der_oid(f"{base}.5"), der_enum(sgx_type)),
    ]
    if platform_instance_id is not None:
        items.append(der_seq(der_oid(f"{base}.6"), der_octets(platform_instance_id)))
    if configuration is not None:
        conf = [der_seq(der_oid(f"{base}.7.{i + 1}"), der_bool(v)) for i, v in enumerate(configuration)]
        items.append(der_seq(der_oid(f"{base}.7"), der_seq(*conf)))
    return der_seq(*items)


# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------


def iso(ts: int | float) -> str:
    """Intel's collateral date format: 2025-01-01T00:00:00Z."""
    return _dt.datetime.fromtimestamp(int(ts), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(ts: int | float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(int(ts), _dt.UTC)


def compact_json(obj: Any) -> str:
    """The exact string Intel signs: compact JSON, keys in the order given."""
    return json.dumps(obj, separators=(",", ":"))


def raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature as 64 bytes r||s (the quote's and Intel collateral's encoding)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    return point[1:]  # x || y without the 0x04 prefix


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomic write: a reader never sees half a file (tests may share a directory)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _issue(*, subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           issuer_key: ec.EllipticCurvePrivateKey, not_before: int, not_after: int, ca: bool,
           path_length: int | None, crl_url: str, serial: int | None = None,
           extra: Iterable[x509.ExtensionType] = (), basic_constraints: bool = True,
           key_usage: x509.KeyUsage | None = None,
           critical_extra: Iterable[x509.ExtensionType] = ()) -> x509.Certificate:
    """One certificate with the extensions Intel's carry: AKI, CRL DP, SKI, KU (critical), BC (critical).
    For tests of path validation: `basic_constraints=False` leaves BC out, `key_usage` replaces the
    usual usage, `critical_extra` adds extensions marked critical."""
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(serial if serial is not None else x509.random_serial_number())
               .not_valid_before(_utc(not_before)).not_valid_after(_utc(not_after))
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False)
               .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                   full_name=[x509.UniformResourceIdentifier(crl_url)], relative_name=None, reasons=None,
                   crl_issuer=None)]), critical=False)
               .add_extension(_ski(key), critical=False))
    if ca:
        usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True,
                              crl_sign=True, encipher_only=False, decipher_only=False)
    else:
        usage = x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=False,
                              crl_sign=False, encipher_only=False, decipher_only=False)
    builder = builder.add_extension(key_usage or usage, critical=True)
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    for ext in critical_extra:
        builder = builder.add_extension(ext, critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


# ---------------------------------------------------------------------------------------------------
# the platform
# ---------------------------------------------------------------------------------------------------

_CA_NAMES = {"root": ROOT_CN, "processor": PROCESSOR_CA_CN, "platform": PLATFORM_CA_CN}
_CA_KEY = {"root": "root", "processor": "processor_ca", "platform": "platform_ca"}


def _pck_name(level: str, ca: str) -> str:
    return f"pck_{ca}_{level}"


class SimPlatform:
    """A simulated SGX platform living in one directory; see the module docstring."""

    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.directory = directory
        self._state = state
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {
            name: serialization.load_pem_private_key(pem.encode(), None)  # type: ignore[misc]
            for name, pem in state["keys"].items()
        }
        self._certs: dict[str, x509.Certificate] = {
            name: x509.load_pem_x509_certificate(pem.encode()) for name, pem in state["certs"].items()
        }
        self.ppid = bytes.fromhex(state["ppid"])
        self.platform_instance_id = bytes.fromhex(state["platform_instance_id"])
        self.fmspc = bytes.fromhex(state["fmspc"])
        self.pce_id = bytes.fromhex(state["pce_id"])
        self.root_ca_pem: bytes = state["certs"]["root"].encode()
        self.root_ca_der: bytes = self._certs["root"].public_bytes(serialization.Encoding.DER)
        self._chains: dict[tuple[str, str], bytes] = {}
        self._collateral_cache: dict[str, Collateral] = {}
        self._collateral_expiry = 0  # earliest nextUpdate of the cached bundle

    # -- creation / reuse ---------------------------------------------------------------------------

    @classmethod
    def init(cls, directory: str | Path) -> SimPlatform:
        """Create the platform in `directory` once; later calls reuse its keys and certificates.

        Writes DIR/root_ca.pem and DIR/collateral.json; re-signs the collateral when it expires within
        a day, so a long-lived directory (a demo, a developer's checkout) keeps working.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # A demo may start server and client on one directory at once: one creates, the other reuses.
        with open(directory / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return cls._init_locked(directory)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @classmethod
    def _init_locked(cls, directory: Path) -> SimPlatform:
        state_path = directory / "platform.json"
        state: dict[str, Any] | None = None
        if state_path.exists():
            loaded = json.loads(state_path.read_text())
            if loaded.get("version") == STATE_VERSION:
                state = loaded
        if state is None:
            state = _generate_state(int(time.time()))
            _write(state_path, json.dumps(state, indent=1).encode(), 0o600)
        plat = cls(directory, state)
        root_path = directory / "root_ca.pem"
        if not root_path.exists() or root_path.read_bytes() != plat.root_ca_pem:
            _write(root_path, plat.root_ca_pem)
        plat._ensure_collateral(int(time.time()))
        return plat

    def _ensure_collateral(self, now: int) -> None:
        path = self.directory / "collateral.json"
        if path.exists():
            try:
                coll = Collateral.from_json(path.read_text())
                expiry = self._bundle_expiry(coll)
                if expiry > now + REFRESH_MARGIN and self._signed_by_us(coll):
                    self._collateral_cache["processor"] = coll
                    self._collateral_expiry = expiry
                    return
            except (dcap_quote.DcapError, ValueError, KeyError):
                pass  # unreadable or foreign: replace it
        coll = self.build_collateral(issue=now - BACKDATE)
        _write(path, coll.to_json().encode())
        self._collateral_cache["processor"] = coll
        self._collateral_expiry = self._bundle_expiry(coll)

    def _signed_by_us(self, coll: Collateral) -> bool:
        return self.tcb_signing_chain_pem() == coll.tcb_info_issuer_chain

    @staticmethod
    def _bundle_expiry(coll: Collateral) -> int:
        ends = [json.loads(coll.tcb_info)["nextUpdate"], json.loads(coll.qe_identity)["nextUpdate"]]
        stamps = [_iso_to_ts(e) for e in ends]
        for crl_der in (coll.root_ca_crl, coll.pck_crl):
            nxt = x509.load_der_x509_crl(crl_der).next_update_utc
            if nxt is not None:
                stamps.append(int(nxt.timestamp()))
        return min(stamps)

    # -- certificates -------------------------------------------------------------------------------

    def certificate(self, name: str) -> x509.Certificate:
        """By name: root, processor_ca, platform_ca, tcb_signing, pck_<ca>_<level>."""
        return self._certs[name]

    def serial(self, name: str) -> int:
        return self._certs[name].serial_number

    def pck_certificate(self, tcb: str = "UpToDate", ca: str = "processor") -> x509.Certificate:
        return self._certs[_pck_name(_level(tcb).name, _ca(ca))]

    def pck_chain_pem(self, tcb: str = "UpToDate", ca: str = "processor") -> bytes:
        """Leaf, intermediate, root as PEM: the certification data (type 5) of a quote."""
        key = (_level(tcb).name, _ca(ca))
        chain = self._chains.get(key)
        if chain is None:
            names = (_pck_name(*key), _CA_KEY[key[1]], "root")
            chain = "".join(self._state["certs"][n] for n in names).encode()
            self._chains[key] = chain
        return chain

    def pck_crl_issuer_chain_pem(self, ca: str = "processor") -> str:
        return self._state["certs"][_CA_KEY[_ca(ca)]] + self._state["certs"]["root"]

    def tcb_signing_chain_pem(self) -> str:
        return self._state["certs"]["tcb_signing"] + self._state["certs"]["root"]

    def issue_pck_certificate(self, tcb: str = "UpToDate", *, ca: str = "processor",
                              not_before: int | None = None, not_after: int | None = None,
                              serial: int | None = None, fmspc: bytes | None = None,
                              pce_id: bytes | None = None, sgx_svns: Iterable[int] | None = None,
                              pce_svn: int | None = None, cpu_svn: bytes | None = None,
                              extension: bytes | None = None, key: str | None = None) -> bytes:
        """A PCK leaf for the level's key with custom content (PEM), for tests of the chain checks.

        Returns leaf || intermediate || root PEM, ready as `make_quote(..., pck_chain=...)`.
        """
        level = _level(tcb)
        ca = _ca(ca)
        now = int(time.time())
        leaf_key = self._keys[key or f"pck_{level.name}"]
        if extension is None:
            overrides: dict[str, Any] = {"pce_svn": pce_svn, "cpu_svn": cpu_svn}
            if sgx_svns is not None:
                overrides["sgx_svns"] = tuple(sgx_svns)
            if fmspc is not None:
                overrides["fmspc"] = fmspc
            if pce_id is not None:
                overrides["pce_id"] = pce_id
            extension = self._sgx_ext(level, ca, **overrides)
        cert = _issue(subject=_name(PCK_CN), key=leaf_key, issuer=_name(_CA_NAMES[ca]),
                      issuer_key=self._keys[_CA_KEY[ca]],
                      not_before=not_before if not_before is not None else now - DAY,
                      not_after=not_after if not_after is not None else now + 7 * 365 * DAY,
                      ca=False, path_length=None, crl_url=CRL_URL[ca], serial=serial,
                      extra=[x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXT_OID), extension)])
        return (_cert_pem(cert) + self._state["certs"][_CA_KEY[ca]] + self._state["certs"]["root"]).encode()

    def reissue_pck_chain(self, tcb: str = "UpToDate", *, ca: str = "processor",
                          leaf: dict[str, Any] | None = None, intermediate: dict[str, Any] | None = None,
                          sub_ca: dict[str, Any] | None = None) -> list[bytes]:
        """A PCK chain whose leaf and intermediate are re-issued (same names and keys, fresh serials)
        with `_issue` keywords overridden, for tests of path validation: `{"ca": True}` for a leaf that
        claims to be a CA, `{"basic_constraints": False}`, `{"key_usage": ...}`, `{"critical_extra":
        [...]}`.  `sub_ca` (a dict, possibly empty) inserts a second CA with a fresh key between
        intermediate and leaf, which exceeds the intermediate's pathLenConstraint 0.  Every signature is
        genuine.  Returns the PEM certificates leaf first, root last (join them in any order)."""
        level = _level(tcb)
        ca = _ca(ca)
        now = int(time.time())
        ca_name, ca_key = _name(_CA_NAMES[ca]), self._keys[_CA_KEY[ca]]
        inter = _issue(**{"subject": ca_name, "key": ca_key, "issuer": _name(ROOT_CN),
                          "issuer_key": self._keys["root"], "not_before": now - DAY,
                          "not_after": now + 365 * DAY, "ca": True, "path_length": 0,
                          "crl_url": CRL_URL["root"], **(intermediate or {})})
        pems = [_cert_pem(inter)]
        issuer_name, issuer_key = ca_name, ca_key
        if sub_ca is not None:
            sub_key = _new_key()
            sub_name = _name("SIMULATED Intel SGX PCK Sub CA")
            sub = _issue(**{"subject": sub_name, "key": sub_key, "issuer": ca_name, "issuer_key": ca_key,
                            "not_before": now - DAY, "not_after": now + 365 * DAY, "ca": True,
                            "path_length": None, "crl_url": CRL_URL[ca], **sub_ca})
            pems.insert(0, _cert_pem(sub))
            issuer_name, issuer_key = sub_name, sub_key
        ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXT_OID), self._sgx_ext(level, ca))
        cert = _issue(**{"subject": _name(PCK_CN), "key": self._keys[f"pck_{level.name}"],
                         "issuer": issuer_name, "issuer_key": issuer_key, "not_before": now - DAY,
                         "not_after": now + 365 * DAY, "ca": False, "path_length": None,
                         "crl_url": CRL_URL[ca], "extra": [ext], **(leaf or {})})
        return [p.encode() for p in (_cert_pem(cert), *pems, self._state["certs"]["root"])]

    def reissue_tcb_signing_chain(self, **overrides: Any) -> str:
        """TCB signing certificate re-issued (same name and key, so Intel-style signatures by the sim
        still verify) with `_issue` keywords overridden, followed by the root: an issuer chain for
        tests of path validation."""
        now = int(time.time())
        cert = _issue(**{"subject": _name(TCB_SIGNING_CN), "key": self._keys["tcb_signing"],
                         "issuer": _name(ROOT_CN), "issuer_key": self._keys["root"], "not_before": now - DAY,
                         "not_after": now + 365 * DAY, "ca": False, "path_length": None,
                         "crl_url": CRL_URL["root"], **overrides})
        return _cert_pem(cert) + self._state["certs"]["root"]

    def reissue_root(self, **overrides: Any) -> bytes:
        """The root re-issued, self-signed (same name and key, so every certificate and CRL the sim
        issued still verifies under it) with `_issue` keywords overridden, as PEM: a trust anchor for
        tests of path validation."""
        now = int(time.time())
        cert = _issue(**{"subject": _name(ROOT_CN), "key": self._keys["root"], "issuer": _name(ROOT_CN),
                         "issuer_key": self._keys["root"], "not_before": now - DAY,
                         "not_after": now + 365 * DAY, "ca": True, "path_length": 1,
                         "crl_url": CRL_URL["root"], **overrides})
        return _cert_pem(cert).encode()

    def _sgx_ext(self, level: SimTcbLevel, ca: str, **overrides: Any) -> bytes:
        args: dict[str, Any] = {"ppid": self.ppid, "platform_instance_id": self.platform_instance_id,
                                "fmspc": self.fmspc, "pce_id": self.pce_id}
        args.update(overrides)
        return _pck_extension(level, ca, **args)

    # -- collateral ---------------------------------------------------------------------------------

    def collateral(self, *, tcb: str = "UpToDate", ca: str = "processor") -> Collateral:
        """The current collateral bundle.  One bundle serves every TCB level (the TCB info lists them
        all); `tcb` is accepted so callers can say which quote they mean.  `ca` picks the PCK CRL."""
        _level(tcb)
        ca = _ca(ca)
        now = int(time.time())
        if self._collateral_expiry <= now + REFRESH_MARGIN:  # a long-running demo outlived its bundle
            self._collateral_cache.clear()
            self._ensure_collateral(now)
        coll = self._collateral_cache.get(ca)
        if coll is None:
            proc = self.collateral(ca="processor")
            issue = _iso_to_ts(json.loads(proc.tcb_info)["issueDate"])
            coll = self.build_collateral(ca=ca, issue=issue)
            self._collateral_cache[ca] = coll
        return coll

    def collateral_json(self, *, ca: str = "processor") -> str:
        return self.collateral(ca=ca).to_json()

    def tcb_info_dict(self, *, issue: int, next_update: int | None = None,
                      levels: Iterable[SimTcbLevel] = TCB_LEVELS) -> dict[str, Any]:
        """TCB Info v3 for this platform (key order as Intel's)."""
        tcb_levels = []
        for level in levels:
            tcb = {"sgxtcbcomponents": [{"svn": s} for s in level.sgx_svns], "pcesvn": level.pce_svn}
            tcb_levels.append(_level_entry(tcb, level))
        return {
            "id": "SGX",
            "version": 3,
            "issueDate": iso(issue),
            "nextUpdate": iso(next_update if next_update is not None else issue + COLLATERAL_VALIDITY),
            "fmspc": self.fmspc.hex().upper(),
            "pceId": self.pce_id.hex().upper(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
            "tcbLevels": tcb_levels,
        }

    def qe_identity_dict(self, *, issue: int, next_update: int | None = None,
                         levels: Iterable[SimQeLevel] = QE_TCB_LEVELS) -> dict[str, Any]:
        """QE Identity v2 matching the sim's quoting enclave (key order as Intel's)."""
        tcb_levels = [_level_entry({"isvsvn": level.isv_svn}, level) for level in levels]
        return {
            "id": "QE",
            "version": 2,
            "issueDate": iso(issue),
            "nextUpdate": iso(next_update if next_update is not None else issue + COLLATERAL_VALIDITY),
            "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
            "miscselect": QE_MISC_SELECT.to_bytes(4, "big").hex().upper(),
            "miscselectMask": "FFFFFFFF",
            "attributes": QE_ATTRIBUTES.hex().upper(),
            "attributesMask": QE_ATTRIBUTES_MASK.hex().upper(),
            "mrsigner": QE_MR_SIGNER.hex().upper(),
            "isvprodid": QE_ISV_PROD_ID,
            "tcbLevels": tcb_levels,
        }

    def tdx_tcb_info_dict(self, *, issue: int, next_update: int | None = None,
                          levels: Iterable[SimTcbLevel] = TCB_LEVELS,
                          module_levels: Iterable[SimModuleLevel] = TDX_MODULE_LEVELS) -> dict[str, Any]:
        """TDX TCB Info v3 (id "TDX") for this platform: the SGX levels with TDX components, the TDX
        1.0 module and the TDX_01 module identity (key order as Intel's)."""
        d = self.tcb_info_dict(issue=issue, next_update=next_update, levels=levels)
        for entry, level in zip(d["tcbLevels"], levels, strict=True):
            entry["tcb"]["tdxtcbcomponents"] = [{"svn": v} for v in _tdx_svns(level)]
        module = {"mrsigner": TDX_MODULE_MR_SIGNER.hex().upper(), "attributes": "0000000000000000",
                  "attributesMask": "FFFFFFFFFFFFFFFF"}
        mlevels = [_level_entry({"isvsvn": m.isv_svn}, m) for m in module_levels]
        out = {"id": "TDX"}
        out.update({k: v for k, v in d.items() if k not in ("id", "tcbLevels")})
        out["tdxModule"] = module
        out["tdxModuleIdentities"] = [{"id": f"TDX_{TDX_MODULE_MAJOR:02X}", **module, "tcbLevels": mlevels}]
        out["tcbLevels"] = d["tcbLevels"]
        return out

    def td_qe_identity_dict(self, *, issue: int, next_update: int | None = None,
                            levels: Iterable[SimQeLevel] = QE_TCB_LEVELS) -> dict[str, Any]:
        """TD QE Identity v2 (id "TD_QE") matching the sim's TD quoting enclave."""
        d = self.qe_identity_dict(issue=issue, next_update=next_update, levels=levels)
        d["id"] = "TD_QE"
        d["isvprodid"] = TD_QE_ISV_PROD_ID
        return d

    def tdx_collateral(self, *, ca: str = "processor") -> Collateral:
        """The current TDX collateral bundle (same CRLs and issue time as collateral(), TDX TCB info and
        TD QE identity), signed once per CA."""
        ca = _ca(ca)
        sgx = self.collateral(ca=ca)
        key = f"tdx-{ca}"
        coll = self._collateral_cache.get(key)
        if coll is None or coll.root_ca_crl != sgx.root_ca_crl:
            tcb = json.loads(sgx.tcb_info)
            issue, nxt = _iso_to_ts(tcb["issueDate"]), _iso_to_ts(tcb["nextUpdate"])
            coll = self.build_collateral(
                ca=ca, issue=issue, validity=nxt - issue, root_ca_crl=sgx.root_ca_crl, pck_crl=sgx.pck_crl,
                tcb_info=self.tdx_tcb_info_dict(issue=issue, next_update=nxt),
                qe_identity=self.td_qe_identity_dict(issue=issue, next_update=nxt))
            self._collateral_cache[key] = coll
        return coll

    def sign_json(self, obj: dict[str, Any] | str, *, key: str = "tcb_signing") -> tuple[str, bytes]:
        """Sign TCB info / QE identity as Intel does: ECDSA P-256 SHA-256 over the exact compact JSON
        string, signature as 64-byte r||s.  Returns (the signed string, signature)."""
        text = obj if isinstance(obj, str) else compact_json(obj)
        return text, raw_signature(self._keys[key], text.encode())

    def make_crl(self, issuer: str, *, revoked: Iterable[int] = (), this_update: int | None = None,
                 next_update: int | None = None, crl_number: int = 1, key: str | None = None) -> bytes:
        """A DER CRL by `issuer` ("root", "processor" or "platform") revoking `revoked` serials.
        `key` signs with another of the sim's keys (a CRL with a bad signature)."""
        now = int(time.time())
        this_update = this_update if this_update is not None else now - BACKDATE
        next_update = next_update if next_update is not None else this_update + COLLATERAL_VALIDITY
        issuer_key = self._keys[_CA_KEY[issuer]]
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(_name(_CA_NAMES[issuer]))
                   .last_update(_utc(this_update)).next_update(_utc(next_update))
                   .add_extension(x509.CRLNumber(crl_number), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_utc(this_update)).build())
        crl = builder.sign(self._keys[key] if key else issuer_key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.DER)

    def build_collateral(self, *, ca: str = "processor", issue: int | None = None,
                         validity: int = COLLATERAL_VALIDITY,
                         tcb_info: dict[str, Any] | str | None = None,
                         qe_identity: dict[str, Any] | str | None = None,
                         revoked_pck_serials: Iterable[int] = (), revoked_ca_serials: Iterable[int] = (),
                         root_ca_crl: bytes | None = None, pck_crl: bytes | None = None) -> Collateral:
        """Freshly signed collateral; every piece can be replaced, and each replacement is signed too.

        Defaults: everything issued at `issue` (default: now minus an hour) and valid for `validity`.
        """
        ca = _ca(ca)
        issue = issue if issue is not None else int(time.time()) - BACKDATE
        nxt = issue + validity
        tcb_text, tcb_sig = self.sign_json(tcb_info if tcb_info is not None
                                           else self.tcb_info_dict(issue=issue, next_update=nxt))
        qe_text, qe_sig = self.sign_json(qe_identity if qe_identity is not None
                                         else self.qe_identity_dict(issue=issue, next_update=nxt))
        if root_ca_crl is None:
            root_ca_crl = self.make_crl("root", revoked=revoked_ca_serials, this_update=issue,
                                        next_update=nxt)
        if pck_crl is None:
            pck_crl = self.make_crl(ca, revoked=revoked_pck_serials, this_update=issue, next_update=nxt)
        chain = self.tcb_signing_chain_pem()
        return Collateral(
            pck_crl_issuer_chain=self.pck_crl_issuer_chain_pem(ca), root_ca_crl=root_ca_crl, pck_crl=pck_crl,
            tcb_info_issuer_chain=chain, tcb_info=tcb_text, tcb_info_signature=tcb_sig,
            qe_identity_issuer_chain=chain, qe_identity=qe_text, qe_identity_signature=qe_sig)

    # -- quotes -------------------------------------------------------------------------------------

    def make_quote(self, report_data: bytes, *, mr_enclave: bytes = DEFAULT_MR_ENCLAVE,
                   mr_signer: bytes = DEFAULT_MR_SIGNER, attributes: bytes | None = None, debug: bool = False,
                   isv_prod_id: int = 0, isv_svn: int = 0, tcb: str = "UpToDate", version: int = 3,
                   ca: str = "processor", qe_svn: int = QE_SVN_UP_TO_DATE,
                   qe_vendor_id: bytes = dcap_quote.INTEL_QE_VENDOR_ID, qe_auth_data: bytes = QE_AUTH_DATA,
                   pck_chain: bytes | None = None, qe_report_overrides: dict[str, Any] | None = None,
                   attestation_key_type: int = dcap_quote.ATT_KEY_ECDSA_P256) -> bytes:
        """A genuine ECDSA quote (v3 or v4, certification data type 5) signed by this platform.

        The QE report is signed by the PCK leaf key of the chosen TCB level and binds the attestation
        key (report_data = SHA256(attestation_key || qe_auth_data) || zeros); the attestation key signs
        header || report body.  `debug` sets the DEBUG attribute bit (on top of `attributes`).
        Keywords after `ca` exist for tests: an old QE (`qe_svn`), another vendor, a custom PCK chain
        (from issue_pck_certificate), QE report fields that violate the QE identity.  They are still
        signed correctly, so only the check they target can fail.
        """
        if len(report_data) != 64:
            raise ValueError("report_data must be exactly 64 bytes")
        if len(mr_enclave) != 32 or len(mr_signer) != 32:
            raise ValueError("mr_enclave and mr_signer must be 32 bytes")
        if version not in (dcap_quote.SGX_QUOTE_V3, dcap_quote.SGX_QUOTE_V4, dcap_quote.QUOTE_V5):
            raise ValueError("version must be 3, 4 or 5")
        level = _level(tcb)
        ca = _ca(ca)
        attrs = bytearray(attributes if attributes is not None else DEFAULT_ATTRIBUTES)
        if len(attrs) != 16:
            raise ValueError("attributes must be 16 bytes")
        if debug:
            attrs[0] |= DEBUG_FLAG
        att_key = self._keys["attestation"]
        att_pub = _raw_public_key(att_key)
        header = dcap_quote.QuoteHeader(
            version=version, attestation_key_type=attestation_key_type, tee_type=dcap_quote.TEE_SGX,
            qe_svn=qe_svn,
            pce_svn=level.pce_svn, qe_vendor_id=qe_vendor_id,
            user_data=hashlib.sha256(self.ppid).digest()[:16] + bytes(4))
        report = _report_body(cpu_svn=level.cpu_svn, attributes=bytes(attrs), mr_enclave=mr_enclave,
                              mr_signer=mr_signer, isv_prod_id=isv_prod_id, isv_svn=isv_svn,
                              report_data=report_data)
        qe_fields: dict[str, Any] = {
            "cpu_svn": level.cpu_svn, "attributes": QE_REPORT_ATTRIBUTES, "mr_enclave": QE_MR_ENCLAVE,
            "mr_signer": QE_MR_SIGNER, "isv_prod_id": QE_ISV_PROD_ID, "isv_svn": qe_svn,
            "misc_select": QE_MISC_SELECT,
            "report_data": hashlib.sha256(att_pub + qe_auth_data).digest() + bytes(32),
        }
        qe_fields.update(qe_report_overrides or {})
        chain = pck_chain if pck_chain is not None else self.pck_chain_pem(level.name, ca)
        return self._sign_quote(header, report, level, qe_fields, qe_auth_data, chain)

    def _sign_quote(self, header: dcap_quote.QuoteHeader, report: dcap_quote.ReportBody | dcap_quote.TdReport,
                    level: SimTcbLevel, qe_fields: dict[str, Any], qe_auth_data: bytes, chain: bytes,
                    padding: int = 0) -> bytes:
        """QE report signed by the level's PCK key, body signed by the attestation key, as bytes."""
        att_key = self._keys["attestation"]
        qe_report = _report_body(**qe_fields)
        qe_sig = raw_signature(self._keys[f"pck_{level.name}"], qe_report.to_bytes())
        unsigned = dcap_quote.QuoteSignatureData(
            isv_signature=bytes(64), attestation_key=_raw_public_key(att_key), qe_report=qe_report,
            qe_report_signature=qe_sig, qe_auth_data=qe_auth_data,
            # Real quotes end the PEM chain with a NUL byte (a C string); so do we.
            certification_data=dcap_quote.CertificationData(dcap_quote.CERT_PCK_CHAIN, chain + b"\x00"))
        signed = dcap_quote.Quote(header, report, unsigned).signed_bytes
        signature = dataclasses.replace(unsigned, isv_signature=raw_signature(att_key, signed))
        return dcap_quote.Quote(header, report, signature, padding=padding).to_bytes()

    def make_td_quote(self, report_data: bytes, *, tcb: str = "UpToDate", td_tcb: str | None = None,
                      module_svn: int = TDX_MODULE_SVN_UP_TO_DATE, module_major: int = TDX_MODULE_MAJOR,
                      version: int = 4, td15: bool = False, tee_tcb_svn_2: bytes | None = None,
                      mr_td: bytes = DEFAULT_MR_TD, rtmrs: tuple[bytes, ...] = (bytes(48),) * 4,
                      debug: bool = False, td_attributes: bytes | None = None,
                      mr_signer_seam: bytes = TDX_MODULE_MR_SIGNER, seam_attributes: bytes = bytes(8),
                      ca: str = "processor", qe_svn: int = QE_SVN_UP_TO_DATE, padding: int = 0,
                      qe_auth_data: bytes = QE_AUTH_DATA) -> bytes:
        """A genuine TDX quote (v4, or v5 with a TD report 1.0 or, `td15`, 1.5) signed by this platform.

        `tcb` picks the PCK leaf (SGX components, PCESVN) as in make_quote; `td_tcb` (default `tcb`)
        the level whose TDX component goes into tee_tcb_svn[2]; `module_svn` / `module_major`
        tee_tcb_svn[0] / [1] (major 0 = TDX 1.0, judged by tdxModule).  `tee_tcb_svn_2` (1.5 only,
        default = tee_tcb_svn) is the TCB a relaunched TD would get.  `debug` sets TUD.DEBUG."""
        if len(report_data) != 64:
            raise ValueError("report_data must be exactly 64 bytes")
        if version not in (dcap_quote.SGX_QUOTE_V4, dcap_quote.QUOTE_V5):
            raise ValueError("a TD quote is version 4 or 5")
        if td15 and version != dcap_quote.QUOTE_V5:
            raise ValueError("a TD report 1.5 needs quote version 5")
        level = _level(tcb)
        tdx_level = _level(td_tcb or tcb)
        ca = _ca(ca)
        tee_tcb_svn = bytes((module_svn, module_major, _tdx_gen(tdx_level) if tdx_level is not _BELOW else 1)
                            + (0,) * 13)
        attrs = bytearray(td_attributes if td_attributes is not None else DEFAULT_TD_ATTRIBUTES)
        if debug:
            attrs[0] |= TD_DEBUG_FLAG
        report = dcap_quote.TdReport(
            tee_tcb_svn=tee_tcb_svn, mr_seam=hashlib.sha384(b"ASPS SIMULATED TDX module").digest(),
            mr_signer_seam=mr_signer_seam, seam_attributes=seam_attributes, td_attributes=bytes(attrs),
            xfam=bytes.fromhex("e718060000000000"), mr_td=mr_td, mr_config_id=bytes(48), mr_owner=bytes(48),
            mr_owner_config=bytes(48), rtmr0=rtmrs[0], rtmr1=rtmrs[1], rtmr2=rtmrs[2], rtmr3=rtmrs[3],
            report_data=report_data,
            tee_tcb_svn_2=(tee_tcb_svn_2 if tee_tcb_svn_2 is not None else tee_tcb_svn) if td15 else None,
            mr_service_td=bytes(48) if td15 else None)
        header = dcap_quote.QuoteHeader(
            version=version, attestation_key_type=dcap_quote.ATT_KEY_ECDSA_P256, tee_type=dcap_quote.TEE_TDX,
            qe_svn=qe_svn, pce_svn=level.pce_svn, qe_vendor_id=dcap_quote.INTEL_QE_VENDOR_ID,
            user_data=hashlib.sha256(self.ppid).digest()[:16] + bytes(4))
        att_pub = _raw_public_key(self._keys["attestation"])
        qe_fields: dict[str, Any] = {
            "cpu_svn": level.cpu_svn, "attributes": QE_REPORT_ATTRIBUTES, "mr_enclave": QE_MR_ENCLAVE,
            "mr_signer": QE_MR_SIGNER, "isv_prod_id": TD_QE_ISV_PROD_ID, "isv_svn": qe_svn,
            "misc_select": QE_MISC_SELECT,
            "report_data": hashlib.sha256(att_pub + qe_auth_data).digest() + bytes(32),
        }
        return self._sign_quote(header, report, level, qe_fields, qe_auth_data,
                                self.pck_chain_pem(level.name, ca), padding)

    def resign_quote(self, raw: bytes) -> bytes:
        """Re-sign header || report body of an (edited) quote with the attestation key, so an edit to
        the header (version, key type, TEE type, vendor) meets the check it targets, not the ISV
        signature.  Works on bytes only: the edited quote need not be parseable."""
        signed_len = dcap_quote.HEADER_LEN + dcap_quote.REPORT_BODY_LEN
        v5_size = int.from_bytes(raw[50:54], "little") if len(raw) >= 54 else 0
        if int.from_bytes(raw[0:2], "little") == dcap_quote.QUOTE_V5 and v5_size in (
                dcap_quote.REPORT_BODY_LEN, dcap_quote.TD_REPORT10_LEN, dcap_quote.TD_REPORT15_LEN):
            signed_len = 54 + v5_size
        elif len(raw) >= 8 and int.from_bytes(raw[4:8], "little") == dcap_quote.TEE_TDX:
            signed_len = dcap_quote.HEADER_LEN + dcap_quote.TD_REPORT10_LEN
        sig_at = signed_len + 4
        if len(raw) < sig_at + dcap_quote.ECDSA_SIG_LEN:
            raise ValueError("quote too short to re-sign")
        sig = raw_signature(self._keys["attestation"], raw[:signed_len])
        return raw[:sig_at] + sig + raw[sig_at + dcap_quote.ECDSA_SIG_LEN:]


def _report_body(*, cpu_svn: bytes, attributes: bytes, mr_enclave: bytes, mr_signer: bytes, isv_prod_id: int,
                 isv_svn: int, report_data: bytes, misc_select: int = 0) -> dcap_quote.ReportBody:
    return dcap_quote.ReportBody(
        cpu_svn=cpu_svn, misc_select=misc_select, reserved1=bytes(12), isv_ext_prod_id=bytes(16),
        attributes=attributes, mr_enclave=mr_enclave, reserved2=bytes(32), mr_signer=mr_signer,
        reserved3=bytes(32), config_id=bytes(64), isv_prod_id=isv_prod_id, isv_svn=isv_svn, config_svn=0,
        reserved4=bytes(42), isv_family_id=bytes(16), report_data=report_data)


def _pck_extension(level: SimTcbLevel, ca: str, *, ppid: bytes, platform_instance_id: bytes, fmspc: bytes,
                   pce_id: bytes, sgx_svns: tuple[int, ...] | None = None, pce_svn: int | None = None,
                   cpu_svn: bytes | None = None) -> bytes:
    """The SGX extension of a PCK leaf for `level`; Platform-CA leaves carry the two extra entries."""
    platform = ca == "platform"
    return sgx_extension_value(
        ppid=ppid, sgx_svns=sgx_svns if sgx_svns is not None else level.sgx_svns,
        pce_svn=level.pce_svn if pce_svn is None else pce_svn, cpu_svn=cpu_svn, pce_id=pce_id, fmspc=fmspc,
        sgx_type=SGX_TYPE_SCALABLE if platform else SGX_TYPE_STANDARD,
        platform_instance_id=platform_instance_id if platform else None,
        configuration=(True, False, False) if platform else None)


def _level(tcb: str) -> SimTcbLevel:
    try:
        return PLATFORMS[tcb]
    except KeyError:
        raise ValueError(f"unknown sim TCB level {tcb!r}; known: {', '.join(PLATFORMS)}") from None


def _ca(ca: str) -> str:
    if ca not in CA_KINDS:
        raise ValueError(f"unknown PCK CA {ca!r}; known: {', '.join(CA_KINDS)}")
    return ca


def _iso_to_ts(text: str) -> int:
    return int(_dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.UTC).timestamp())


def _generate_state(now: int) -> dict[str, Any]:
    """Keys and certificates of a new platform (the expensive part, done once per directory)."""
    names = ("root", "processor_ca", "platform_ca", "tcb_signing", "attestation")
    keys = {name: _new_key() for name in names}
    for name in PLATFORMS:
        keys[f"pck_{name}"] = _new_key()
    start = now - DAY
    root_name = _name(ROOT_CN)
    certs: dict[str, x509.Certificate] = {}
    certs["root"] = _issue(subject=root_name, key=keys["root"], issuer=root_name, issuer_key=keys["root"],
                           not_before=start, not_after=now + 25 * 365 * DAY, ca=True, path_length=1,
                           crl_url=CRL_URL["root"])
    for ca in CA_KINDS:
        certs[_CA_KEY[ca]] = _issue(subject=_name(_CA_NAMES[ca]), key=keys[_CA_KEY[ca]], issuer=root_name,
                                    issuer_key=keys["root"], not_before=start, not_after=now + 15 * 365 * DAY,
                                    ca=True, path_length=0, crl_url=CRL_URL["root"])
    certs["tcb_signing"] = _issue(subject=_name(TCB_SIGNING_CN), key=keys["tcb_signing"], issuer=root_name,
                                  issuer_key=keys["root"], not_before=start, not_after=now + 7 * 365 * DAY,
                                  ca=False, path_length=None, crl_url=CRL_URL["root"])
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "created": now,
        "warning": "SIMULATED SGX platform for tests and demos; never trust its root by default",
        "fmspc": SIM_FMSPC.hex(),
        "pce_id": SIM_PCE_ID.hex(),
        "ppid": os.urandom(16).hex(),
        "platform_instance_id": os.urandom(16).hex(),
    }
    ppid, instance_id = bytes.fromhex(state["ppid"]), bytes.fromhex(state["platform_instance_id"])
    for name, level in PLATFORMS.items():
        for ca in CA_KINDS:
            value = _pck_extension(level, ca, ppid=ppid, platform_instance_id=instance_id, fmspc=SIM_FMSPC,
                                   pce_id=SIM_PCE_ID)
            ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXT_OID), value)
            certs[_pck_name(name, ca)] = _issue(
                subject=_name(PCK_CN), key=keys[f"pck_{name}"], issuer=_name(_CA_NAMES[ca]),
                issuer_key=keys[_CA_KEY[ca]], not_before=start, not_after=now + 7 * 365 * DAY, ca=False,
                path_length=None, crl_url=CRL_URL[ca], extra=[ext])
    state["keys"] = {name: _key_pem(k) for name, k in keys.items()}
    state["certs"] = {name: _cert_pem(c) for name, c in certs.items()}
    return state


# ---------------------------------------------------------------------------------------------------
# provider
# ---------------------------------------------------------------------------------------------------


class SimProvider:
    """attester.QuoteProvider over a SimPlatform: what `get_provider("sim", ...)` returns."""

    name = "sim"

    def __init__(self, sim_dir: str | Path, mr_enclave: bytes = DEFAULT_MR_ENCLAVE,
                 mr_signer: bytes = DEFAULT_MR_SIGNER, isv_prod_id: int = 0, isv_svn: int = 0,
                 debug: bool = False, tcb: str = "UpToDate", tee: str = "sgx", mr_td: bytes = DEFAULT_MR_TD,
                 rtmrs: tuple[bytes, ...] | None = None, relaunch: bool = False) -> None:
        """`tee="tdx"` makes TD quotes (mr_td, rtmrs, debug, tcb); `relaunch` one whose TDX TCB is
        out of date while a relaunch would bring it up to date (TDRelaunchAdvised...)."""
        if tee not in ("sgx", "tdx"):
            raise ValueError(f"tee must be 'sgx' or 'tdx', not {tee!r}")
        if rtmrs is not None and (len(rtmrs) != 4 or any(len(r) != 48 for r in rtmrs)):
            raise ValueError("rtmrs must be four 48-byte values")
        self.tee, self.mr_td, self.relaunch = tee, bytes(mr_td), relaunch
        self.rtmrs = tuple(rtmrs) if rtmrs is not None else (bytes(48),) * 4
        if tee == "tdx":
            self.name = "sim-td"
        self.platform = SimPlatform.init(sim_dir)
        self.mr_enclave = mr_enclave
        self.mr_signer = mr_signer
        self.isv_prod_id = isv_prod_id
        self.isv_svn = isv_svn
        self.debug = debug
        self.tcb = _level(tcb).name

    def get_quote(self, report_data: bytes) -> bytes:
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != 64:
            raise dcap_quote.ProviderError("report_data must be exactly 64 bytes")
        try:
            if self.tee == "tdx":
                return self._td_quote(bytes(report_data))
            return self.platform.make_quote(bytes(report_data), mr_enclave=self.mr_enclave,
                                            mr_signer=self.mr_signer, isv_prod_id=self.isv_prod_id,
                                            isv_svn=self.isv_svn, debug=self.debug, tcb=self.tcb)
        except (ValueError, dcap_quote.QuoteError) as exc:
            raise dcap_quote.ProviderError(f"sim quote generation failed: {exc}") from None

    def _td_quote(self, report_data: bytes) -> bytes:
        if not self.relaunch:
            return self.platform.make_td_quote(report_data, tcb=self.tcb, mr_td=self.mr_td, rtmrs=self.rtmrs,
                                               debug=self.debug)
        latest = bytes((TDX_MODULE_SVN_UP_TO_DATE, TDX_MODULE_MAJOR, _tdx_gen(TCB_LEVELS[0]))) + bytes(13)
        return self.platform.make_td_quote(report_data, version=5, td15=True, tcb=self.tcb,
                                           td_tcb="OutOfDate", module_svn=4, tee_tcb_svn_2=latest,
                                           mr_td=self.mr_td, rtmrs=self.rtmrs, debug=self.debug)
