"""ASPS operations: what the server tells its operators (Prometheus metrics, grpc.health.v1 kept in
step with collateral, the collateral watch behind both, and the one JSON audit line per decision).

Kept apart from the pipeline so that the request path reads as steps and these concerns can change
(new labels, new audit fields) without touching it. The server's objects are seen through the small
Protocols below, never imported.

Who may import it: asps_server; tests.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from grpc_health.v1 import health, health_pb2

import dcap
import kms
import pccs
import ratls

log = logging.getLogger("asps")
audit_log = logging.getLogger("asps.audit")


# --- what ops reads of the server's objects -------------------------------------------------------------


class Served(Protocol):
    """The pipeline (asps_server.Provisioner) as the scrape-time collector reads it."""

    policy: Any  # policy.Policy: .apps
    tokens: Any  # sized: redeemed challenges remembered
    evidence: Any  # the evidence cache: .hits, .misses (absent when there is none)


class Pool(Protocol):
    """The work pool (asps_server.WorkPool) as its collector reads it."""

    admitted: int
    limit: int
    shed: int


class Loop(Protocol):
    """The server's event loop thread (asps_server.LoopThread) as LoopHealth drives it."""

    loop: Any  # asyncio.AbstractEventLoop

    def call(self, coro: Any, timeout: float | None = None) -> Any: ...

    def on_loop(self) -> bool: ...


class Refused(Protocol):
    """A refusal (asps_server.Refusal) as the audit line records it."""

    step: str
    reason: str
    detail: str | None

    @property
    def status(self) -> Any: ...  # grpc.StatusCode


# --- metrics -----------------------------------------------------------------------------------------


class NullMetrics:
    """Metrics off (no --metrics-port): every hook does nothing; prometheus_client is never imported,
    so a server without metrics needs nothing beyond requirements.txt's core."""

    port: int | None = None

    def decision(self, protocol: str, verdict: str, status: str, step: str | None, seconds: float,
                 tee: str = "none") -> None:
        """One attestation decision (mirrors the audit line); tee is "none" before evidence is verified."""

    def kms(self, result: str, seconds: float) -> None:
        """One KMS fetch for a grant: ok / unavailable / denied / not_found / error."""

    def policy_reload(self, ok: bool) -> None:
        """One SIGHUP reload attempt."""

    def watch(
        self, provisioner: Served, collateral: CollateralWatch | None, monitor: HealthMonitor
    ) -> None:
        """Numbers read at scrape time from the objects that own them."""

    def watch_pool(self, pool: Pool) -> None:
        """The work pool's admitted and shed calls, read at scrape time."""

    def close(self) -> None:
        """Stop serving /metrics."""


def kms_result(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, kms.KmsUnavailable):
        return "unavailable"
    if isinstance(exc, kms.KmsDenied):
        return "denied"
    if isinstance(exc, kms.KmsNotFound):
        return "not_found"
    return "error"


# Bounded label values: steps are names in this file, codes gRPC status names; never measurements or
# reasons (free text), so the number of series stays fixed whatever clients send.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics(NullMetrics):
    """Prometheus metrics on a registry of their own (several servers can share a process), served
    as the text format over plain HTTP on host:port (127.0.0.1 unless told otherwise: the numbers
    are operational, not secret, but there is no reason to show them to the world)."""

    def __init__(self, host: str, port: int) -> None:
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        reg = self.registry
        prom.ProcessCollector(registry=reg)  # process_resident_memory_bytes, cpu seconds, open fds
        self.attestations = prom.Counter(
            "asps_attestations",
            "Attestation decisions by result, gRPC status, the step that refused (none if granted) and "
            "TEE (sgx, tdx; none when refused before the evidence was verified)",
            ["protocol", "result", "code", "step", "tee"],
            registry=reg,
        )
        self.latency = prom.Histogram(
            "asps_get_secrets_duration_seconds",
            "Time to decide one GetSecrets call (token check to sealed reply), by result",
            ["result"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.kms_requests = prom.Counter(
            "asps_kms_requests", "KMS fetches (one per granted request) by result", ["result"], registry=reg
        )
        self.kms_latency = prom.Histogram(
            "asps_kms_request_duration_seconds",
            "Time of one KMS fetch",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.reloads = prom.Counter(
            "asps_policy_reloads", "Policy reloads (SIGHUP) by result", ["result"], registry=reg
        )
        # OSError (port taken, no such address) goes to the caller, who knows the flag's name
        self._http, self._thread = prom.start_http_server(port, addr=host, registry=reg)
        self.port = self._http.server_address[1]

    def decision(self, protocol: str, verdict: str, status: str, step: str | None, seconds: float,
                 tee: str = "none") -> None:
        self._child(self.attestations, (protocol, verdict, status, step or "none", tee)).inc()
        if protocol == "asps.v1":
            self._child(self.latency, (verdict,)).observe(seconds)

    def kms(self, result: str, seconds: float) -> None:
        self._child(self.kms_requests, (result,)).inc()
        self.kms_latency.observe(seconds)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """`metric.labels(*labels)`, looked up once per label tuple: labels() takes the metric's lock
        and re-checks the names on every call. The tuples are few (fixed sets of statuses and steps);
        a race only looks the same child up twice."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def policy_reload(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()

    def watch(
        self, provisioner: Served, collateral: CollateralWatch | None, monitor: HealthMonitor
    ) -> None:
        self.registry.register(_StateCollector(provisioner, collateral, monitor))

    def watch_pool(self, pool: Pool) -> None:
        self.registry.register(_PoolCollector(pool))

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


class _PoolCollector:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "asps_work_pool_admitted",
            "Calls admitted to the work pool now (running or waiting for a thread)",
            value=self.pool.admitted,
        )
        yield GaugeMetricFamily("asps_work_pool_limit", "--max-inflight in force", value=self.pool.limit)
        yield CounterMetricFamily(
            "asps_work_pool_shed",
            "Calls refused RESOURCE_EXHAUSTED: the work pool was full",
            value=self.pool.shed,
        )


class _StateCollector:
    def __init__(
        self, provisioner: Served, collateral: CollateralWatch | None, monitor: HealthMonitor
    ) -> None:
        self.p, self.c, self.m = provisioner, collateral, monitor

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "asps_serving",
            "1 when grpc.health.v1 says SERVING, 0 when NOT_SERVING",
            value=int(self.m.serving),
        )
        yield GaugeMetricFamily(
            "asps_policy_apps", "Apps in the policy in force", value=len(self.p.policy.apps)
        )
        yield GaugeMetricFamily(
            "asps_outstanding_tokens",
            "Redeemed challenges remembered until they expire",
            value=len(self.p.tokens),
        )
        cache = getattr(self.p, "evidence", None)
        if cache is not None and hasattr(cache, "hits"):
            yield CounterMetricFamily(
                "asps_evidence_cache_hits", "Evidence whose verification was remembered", value=cache.hits
            )
            yield CounterMetricFamily(
                "asps_evidence_cache_misses", "Evidence verified in full", value=cache.misses
            )
        if self.c is None:
            return
        s = self.c.snapshot()
        yield CounterMetricFamily(
            "asps_collateral_cache_hits", "Collateral lookups answered from the cache", value=s.hits
        )
        fetches = CounterMetricFamily(
            "asps_collateral_fetches",
            "Collateral fetched or re-read from its source, by result",
            labels=["result"],
        )
        for result, n in sorted(s.fetches.items()):
            fetches.add_metric([result], n)
        yield fetches
        if s.http_requests is not None:
            yield CounterMetricFamily(
                "asps_pccs_http_requests", "HTTP requests made to the PCCS", value=s.http_requests
            )
        if s.earliest_expiry is not None:
            yield GaugeMetricFamily(
                "asps_collateral_expiry_timestamp_seconds",
                "Earliest nextUpdate of the collateral in use (unix time): refresh it before then",
                value=s.earliest_expiry,
            )


# --- collateral watch and health ------------------------------------------------------------------------


@dataclass(frozen=True)
class CollateralState:
    hits: int
    fetches: dict[str, int]
    http_requests: int | None
    earliest_expiry: int | None


class CollateralWatch:
    """Stands between the Verifier and its collateral source: tells a cache hit from a fetch (a new
    object from the source), remembers each platform's collateral expiry, and says whether collateral
    can be used: not when the source is unreachable, a file cannot be read, or collateral in use is
    past its nextUpdate. `probe` retries what failed, so health recovers without a request."""

    MAX_KEYS = 256

    def __init__(self, source: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self._clock = clock
        # a file is one bundle for every platform; a PCCS has one per (FMSPC, CA type)
        self._per_platform = not isinstance(source, pccs.FileCollateralSource)
        self._lock = threading.Lock()
        self._last: dict[tuple[bytes, str], Any] = {}
        self._expiry: dict[tuple[bytes, str], int] = {}
        self._failing: dict[tuple[bytes, str], str] = {}
        self._hits = 0
        self._fetches = {"ok": 0, "unavailable": 0, "invalid": 0}
        self.on_change: Callable[[], None] | None = None

    def get(self, fmspc: bytes, ca: str, now: int | None = None) -> dcap.Collateral:
        return self._lookup(self._key(fmspc, ca), now, count=True)

    def _key(self, fmspc: bytes, ca: str) -> tuple[bytes, str]:
        return (bytes(fmspc), str(ca)) if self._per_platform else (b"", "")

    def _lookup(self, key: tuple[bytes, str], now: int | None, *, count: bool) -> dcap.Collateral:
        try:
            coll = self.source.get(key[0], key[1], now)
        except dcap.DcapError as e:
            unavailable = isinstance(e, dcap.CollateralUnavailable)
            with self._lock:
                self._fetches["unavailable" if unavailable else "invalid"] += 1
                # An unknown FMSPC (PCCS 404) is that platform's problem, not the service's.
                serious = unavailable or not self._per_platform or key in self._last
                changed = serious and key not in self._failing
                if serious and (key in self._failing or len(self._failing) < self.MAX_KEYS):
                    self._failing[key] = str(e)[:300]
            if changed:
                self._changed()
            raise
        with self._lock:
            fresh = self._last.get(key) is not coll
        expiry = None
        if fresh:
            try:
                expiry = dcap.collateral_next_update(coll)
            except dcap.DcapError:
                expiry = None  # the verification itself will say what is wrong with it
        with self._lock:
            if fresh:
                self._fetches["ok"] += 1
                if key in self._last or len(self._last) < self.MAX_KEYS:
                    self._last[key] = coll
                    if expiry is not None:
                        self._expiry[key] = expiry
                    else:
                        self._expiry.pop(key, None)
            elif count:
                self._hits += 1
            changed = self._failing.pop(key, None) is not None
        if changed:
            self._changed()
        return coll

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def probe(self) -> None:
        """Look up every known platform's collateral again (refetching what expired or failed)."""
        with self._lock:
            keys = set(self._last) | set(self._failing)
        if not self._per_platform:
            keys = {(b"", "")}
        now = int(self._clock())
        for key in keys:
            with contextlib.suppress(dcap.DcapError):  # recorded by _lookup
                self._lookup(key, now, count=False)

    def problem(self) -> str | None:
        """Why collateral cannot be used now, or None."""
        now = int(self._clock())
        with self._lock:
            if self._failing:
                return "collateral source failing: " + next(iter(self._failing.values()))
            expired = [e for e in self._expiry.values() if e < now]
        if expired:
            return f"collateral expired {now - min(expired)} s ago (past its nextUpdate) and not refreshed"
        return None

    def snapshot(self) -> CollateralState:
        requests = getattr(self.source, "requests", None)
        with self._lock:
            return CollateralState(
                self._hits,
                dict(self._fetches),
                requests if isinstance(requests, int) else None,
                min(self._expiry.values()) if self._expiry else None,
            )


class HealthMonitor:
    """Keeps grpc.health.v1 in step with whether the service can attest: NOT_SERVING while collateral
    cannot be used, SERVING again once it can. Checked on every change the watch sees and every
    `interval` seconds (probing the source, so recovery needs no client request)."""

    def __init__(
        self,
        servicer: LoopHealth,
        services: Sequence[str],
        collateral: CollateralWatch | None,
        interval: float,
    ) -> None:
        self.servicer, self.services, self.collateral = servicer, tuple(services), collateral
        self.interval = interval
        self.serving = True
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asps-health", daemon=True)
        if collateral is not None:
            collateral.on_change = self.check

    def start(self) -> None:
        self.check(probe=True, initial=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check(probe=True)
            except Exception:  # the monitor must outlive any surprise
                log.exception("health check failed")

    def check(self, *, probe: bool = False, initial: bool = False) -> None:
        if self._stop.is_set():
            return
        if probe and self.collateral is not None:
            self.collateral.probe()
        problem = self.collateral.problem() if self.collateral is not None else None
        with self._lock:
            if self._stop.is_set():
                return
            serving = problem is None
            changed = serving != self.serving or initial
            self.serving, self.reason = serving, problem
            if not changed:
                return  # Watch streams hear of changes only
            if serving and not initial:
                log.warning("health: SERVING again (collateral usable)")
            elif not serving:
                log.error("health: NOT_SERVING: %s", problem)
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in self.services:
                self.servicer.set(service, status)

    def stop(self) -> None:
        with self._lock:
            self._stop.set()


class LoopHealth:
    """grpc.health.v1's aio servicer behind the synchronous `set` that HealthMonitor and `stop` call
    from other threads (from the loop's own thread the change is scheduled, not awaited)."""

    def __init__(self, servicer: health.aio.HealthServicer, loop: Loop) -> None:
        self.servicer, self._loop = servicer, loop

    def set(self, service: str, status: int) -> None:
        if self._loop.loop.is_closed():
            return
        if self._loop.on_loop():
            self._loop.loop.create_task(self.servicer.set(service, status))
        else:
            self._loop.call(self.servicer.set(service, status), timeout=10)


# --- audit -------------------------------------------------------------------------------------------


@dataclass
class AuditRecord:
    """One decision's audit line (written once: granted, refused or failed), also counted in metrics."""

    event: str
    peer: str
    names: list[str]
    app_id: str | None = None
    mr_enclave: str | None = None
    mr_signer: str | None = None
    tcb_status: str | None = None
    tee: str | None = None  # "sgx" / "tdx" once the evidence is verified
    td: dict[str, str] | None = None  # a TD's mr_td and RTMRs (hex)
    start: float = field(default_factory=time.monotonic)
    metrics: NullMetrics | None = None

    def __post_init__(self) -> None:
        # Request names are attacker-controlled: bound what reaches the log before they are checked.
        self.names = [n[:256] for n in self.names[:64]]

    def identity(self, ident: ratls.Identity) -> None:
        self.tcb_status = ident.tcb_status
        self.tee = getattr(ident, "tee", "sgx")
        if self.tee == "tdx":
            self.td = {"mr_td": ident.mr_td.hex(), **{f"rtmr{i}": r.hex() for i, r in enumerate(ident.rtmrs)}}
        else:
            self.mr_enclave, self.mr_signer = ident.mr_enclave.hex(), ident.mr_signer.hex()

    def _emit(
        self, verdict: str, status: str, step: str | None, reason: str | None, detail: str | None
    ) -> None:
        line = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "event": self.event,
            "peer": self.peer,
            "tee": self.tee,
            "mr_enclave": self.mr_enclave,
            "mr_signer": self.mr_signer,
            **(self.td or {}),
            "tcb_status": self.tcb_status,
            "app_id": self.app_id,
            "names": self.names,
            "verdict": verdict,
            "status": status,
            "step": step,
            "reason": reason,
            "ms": round((time.monotonic() - self.start) * 1000, 1),
        }
        if detail:
            line["detail"] = detail
        if self.metrics is not None:
            protocol = "asps.v1" if self.event == "get_secrets" else "legacy"
            self.metrics.decision(protocol, verdict, status, step, time.monotonic() - self.start,
                                  tee=self.tee or "none")
        text = json.dumps(line, sort_keys=False)
        # Serialized once: the formatters write `audit_json` as it is (stderr, JSON mode, audit file).
        audit_log.info(text, extra={"audit": line, "audit_json": text})

    def granted(self) -> None:
        self._emit("granted", "OK", None, None, None)

    def refused(self, r: Refused) -> None:
        self._emit("refused", r.status.name, r.step, r.reason, r.detail)

    def failed(self) -> None:
        self._emit("refused", "INTERNAL", None, "internal error (see the server log)", None)
