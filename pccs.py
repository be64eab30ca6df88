"""Collateral sources for dcap.Verifier: a bundle file, or Intel PCS / a PCCS (v4 API) with a cache,
single flight and back-off.

Who may import it: the tenant side (asps_server, the ratls/dcap command lines).  Never the enclave
side.  It fetches and caches; it verifies nothing itself: the Verifier verifies what a source hands
out and calls `discard` on collateral that does not verify.

Direction: pccs imports dcap (whose CollateralSource Protocol it implements, and whose
collateral_next_update it uses to know when to refetch); dcap never imports pccs, so the verifier
can be given any source (a file, PCCS, a test stand-in) without knowing where collateral comes from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import dcap
from dcap import collateral_key_name as _key_name
from dcap_collateral import Collateral, CollateralError, CollateralUnavailable, crl_der, parse_json
from dcap_collateral import iso_date as _iso
from dcap_collateral import unix_now as _now
from dcap_quote import DcapError

_log = logging.getLogger("dcap.pccs")



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
    doc = parse_json(text, f"{what} response")
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
    TDX_API = "/tdx/certification/v4"
    MAX_FAILURES = 1024  # failed keys remembered (FMSPCs come from quotes: bounded)

    def __init__(self, base_url: str, *, timeout: float = 10.0, session: object | None = None,
                 max_response: int = MAX_PCCS_RESPONSE, retry_after: float = 5.0) -> None:
        base = base_url.rstrip("/")
        self.base = base if base.endswith(self.API) else base + self.API
        self.tdx_base = self.base[:-len(self.API)] + self.TDX_API
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

    def _get(self, path: str, what: str, deadline: float, params: dict[str, str] | None = None,
             *, base: str | None = None) -> _Reply:
        import requests

        url = (base or self.base) + path
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
        """Fetch all four pieces now (no cache), within `timeout` seconds in all.  For a TD
        (`ca` = dcap.TDX_CA_PREFIX + the CA type) the TCB info and QE identity come from the TDX API
        (/tdx/certification/v4/tcb, /tdx/certification/v4/qe/identity: TDX TCB info, TD QE identity);
        the CRLs are the SGX ones (same PCK certificates)."""
        tdx = ca.startswith(dcap.TDX_CA_PREFIX)
        pck_ca = ca[len(dcap.TDX_CA_PREFIX):] if tdx else ca
        if pck_ca not in ("processor", "platform"):
            raise CollateralError(f"PCK CA type must be 'processor' or 'platform', not {ca!r}")
        deadline = time.monotonic() + self.timeout
        # the TDX API sits beside the SGX one: .../sgx/certification/v4 -> .../tdx/certification/v4
        base = self.tdx_base if tdx else self.base
        tcb = self._get("/tcb", "TCB info", deadline, {"fmspc": fmspc.hex()}, base=base)
        tcb_info, tcb_sig = _signed_body(tcb.text("TCB info"), "tcbInfo", "TCB info")
        tcb_chain = self._chain(tcb, "TCB-Info-Issuer-Chain", "TCB info")
        qe = self._get("/qe/identity", "QE identity", deadline, base=base)
        qe_identity, qe_sig = _signed_body(qe.text("QE identity"), "enclaveIdentity", "QE identity")
        qe_chain = self._chain(qe, "SGX-Enclave-Identity-Issuer-Chain", "QE identity")
        crl = self._get("/pckcrl", "PCK CRL", deadline, {"ca": pck_ca, "encoding": "der"})
        pck_crl = crl_der(crl.body)
        crl_chain = self._chain(crl, "SGX-PCK-CRL-Issuer-Chain", "PCK CRL")
        root_crl = crl_der(self._get("/rootcacrl", "root CA CRL", deadline).body)
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
            expiry = dcap.collateral_next_update(collateral)
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


def open_collateral_source(collateral_file: str | None,
                           pccs_url: str | None) -> Collateral | dcap.CollateralSource:
    """What a CLI's --collateral / --pccs options name (exactly one of them)."""
    if bool(collateral_file) == bool(pccs_url):
        raise DcapError("give exactly one of --collateral FILE or --pccs URL")
    if collateral_file:
        return FileCollateralSource(collateral_file)
    return PccsCollateralSource(pccs_url)  # type: ignore[arg-type]
