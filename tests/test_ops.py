"""Operations: Prometheus metrics scraped over real HTTP, grpc.health.v1 following collateral, and a
scaled-down soak (bench/soak.py's load against a subprocess server backed by a real OpenBao)."""

from __future__ import annotations

import secrets
import shutil
import sys
import time
from pathlib import Path

import grpc
import pytest
import requests
from asps_testkit import (  # noqa: F401  (fixtures: env, logs)
    ENCLAVE_1,
    ENCLAVE_2,
    ENCLAVE_UNKNOWN,
    NOT_SERVING,
    SERVING,
    Client,
    assert_no_secret_in,
    health_of,
    module_env,
    module_logs,
    recorded_vault_tokens,
    wait_health,
    write_policy,
)
from openbao import OpenBao, free_port, openbao_server  # noqa: F401  (fixture)
from prometheus_client.parser import text_string_to_metric_families

import asps_server
import dcap
from dcap_collateral import Collateral

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import soak  # noqa: E402

SECRET_1 = "ops-" + secrets.token_hex(12)

pytestmark = pytest.mark.usefixtures("logs")  # every test runs under the log capture


# Values no log line may show: the secrets and every Vault token this module uses.
FORBIDDEN: list[str] = [SECRET_1]


@pytest.fixture(scope="module")
def bao(openbao_server: OpenBao, logs):  # noqa: F811
    openbao_server.enable_kv("ops", version=1)
    openbao_server.kv_put("ops/one", {"key": SECRET_1})
    openbao_server.read_policy("ops-app", "ops/*")
    with recorded_vault_tokens(openbao_server, into=FORBIDDEN):
        yield openbao_server


def policy_file(path: Path, doc: dict) -> Path:
    write_policy(path, doc).chmod(0o600)  # it holds Vault tokens
    return path


def vault_doc(bao: OpenBao) -> dict:
    token = bao.create_token(["ops-app"])
    return {
        "kms": "vault",
        "addr": bao.addr,
        "timeout": 1,
        "app_list": [
            {
                "id": "one",
                "mr_enclave": ENCLAVE_1.hex(),
                "app_token": token,
                "secrets": {"master_key": "ops/one", "gone": "ops/never_written"},
            },
            {"id": "two", "mr_enclave": ENCLAVE_2.hex(), "app_token": token, "secrets": {"k": "ops/one"}},
        ],
    }


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics and parse it: {sample name: {sorted label pairs: value}}."""
    reply = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_scraped_over_http_count_every_decision(env, bao):
    policy = policy_file(env.tmp / "metrics.json", vault_doc(bao))
    handle = asps_server.serve(env.config(policy, metrics_port=0, health_interval=0.5))
    client = Client(f"localhost:{handle.port}", env.ca)
    try:
        port = handle.metrics.port
        assert port and handle.metrics._http.server_address[0] == "127.0.0.1"  # loopback by default
        before = scrape(port)
        assert value(before, "asps_serving") == 1
        assert value(before, "asps_policy_apps") == 2
        ev1, ev_unknown = env.evidence(ENCLAVE_1), env.evidence(ENCLAVE_UNKNOWN)
        for _ in range(3):
            assert client.get(ev1, ["master_key"])[1] == {"master_key": SECRET_1.encode()}
        codes = []
        for req in (
            client.request(ev1, ["master_key"], token=b"\x01" * 57)[0],  # forged token
            client.request(ev_unknown)[0],  # genuine, but no app
            client.request(ev1, ["k"])[0],  # app two's name
            client.request(ev1, ["gone"])[0],  # granted, missing in OpenBao
        ):
            codes.append(client.refused(req).code())
        assert codes == [
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.NOT_FOUND,
        ]
        bao.stop()
        try:
            assert (
                client.refused(client.request(ev1, ["master_key"])[0]).code() == grpc.StatusCode.UNAVAILABLE
            )
        finally:
            bao.start()

        m = scrape(port)
        att = "asps_attestations_total"

        def v1(**labels: str) -> float:
            return value(m, att, protocol="asps.v1", **labels)

        assert v1(result="granted", code="OK", step="none", tee="sgx") == 3
        assert v1(result="refused", code="UNAUTHENTICATED", step="token", tee="none") == 1
        assert (
            v1(result="refused", code="PERMISSION_DENIED", step="policy", tee="sgx") == 1
        )
        assert v1(result="refused", code="NOT_FOUND", step="policy", tee="sgx") == 1
        assert v1(result="refused", code="NOT_FOUND", step="kms", tee="sgx") == 1
        assert v1(result="refused", code="UNAVAILABLE", step="kms", tee="sgx") == 1
        assert sum(m[att].values()) == 8
        # latency histogram: one observation per decision, granted ones in their own series
        hist = "asps_get_secrets_duration_seconds"
        assert value(m, hist + "_count", result="granted") == 3
        assert value(m, hist + "_count", result="refused") == 5
        assert value(m, hist + "_bucket", result="granted", le="+Inf") == 3
        assert 0 < value(m, hist + "_sum", result="granted") < 30
        # KMS: every fetch that reached it, by result
        kms_total = "asps_kms_requests_total"
        assert value(m, kms_total, result="ok") == 3
        assert value(m, kms_total, result="not_found") == 1
        assert value(m, kms_total, result="unavailable") == 1
        assert value(m, "asps_kms_request_duration_seconds_count") == 5
        # collateral: read once from the file, then answered from the cache (an evidence cache in
        # front of the verifier may spare some lookups altogether)
        assert value(m, "asps_collateral_fetches_total", result="ok") == 1
        assert value(m, "asps_collateral_cache_hits_total") >= 1
        coll = Collateral.from_json((env.sim.directory / "collateral.json").read_text())
        expiry = dcap.collateral_next_update(coll)
        assert value(m, "asps_collateral_expiry_timestamp_seconds") == expiry > time.time()
        assert value(m, "process_resident_memory_bytes") > 10 * 2**20
        # bounded labels: no measurement, no free text ever becomes a label value
        labels = {v for samples in m.values() for key in samples for _, v in key}
        assert not any(ENCLAVE_1.hex() in v or ENCLAVE_UNKNOWN.hex() in v or len(v) > 40 for v in labels), (
            labels
        )

        handle.reload_policy()
        policy.write_text("{ broken")
        assert not handle.reload_policy()
        m = scrape(port)
        assert value(m, "asps_policy_reloads_total", result="ok") == 1
        assert value(m, "asps_policy_reloads_total", result="failed") == 1
    finally:
        client.close()
        handle.stop(0)
    with pytest.raises(requests.ConnectionError):  # the endpoint goes away with the server
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_off_by_default_and_port_clash_refuses_to_start(env, bao):
    policy = policy_file(env.tmp / "plain.json", vault_doc(bao))
    handle = asps_server.serve(env.config(policy))
    try:
        assert handle.metrics.port is None
        taken = asps_server.serve(env.config(policy, metrics_port=0))
        try:
            with pytest.raises(asps_server.StartupError, match="--metrics-port"):
                asps_server.serve(env.config(policy, metrics_port=taken.metrics.port))
        finally:
            taken.stop(0)
    finally:
        handle.stop(0)


def test_health_follows_collateral_file_expiry_and_recovery(env, bao):
    """NOT_SERVING while the collateral in use is past its nextUpdate or unreadable; SERVING again
    once a good file is back, with no client request needed."""
    good = env.sim.directory / "collateral.json"
    coll = env.tmp / "health-collateral.json"
    shutil.copy(good, coll)
    now = int(time.time())
    expired = env.sim.build_collateral(issue=now - 7200, validity=3600).to_json()
    policy = policy_file(env.tmp / "health.json", vault_doc(bao))
    handle = asps_server.serve(
        env.config(policy, collateral=str(coll), metrics_port=0, health_interval=0.1, legacy_cczoo=True)
    )
    try:
        assert health_of(handle.port, env.ca) == SERVING
        assert health_of(handle.port, env.ca, asps_server.SERVICE_NAME) == SERVING
        coll.write_text(expired)
        wait_health(handle.port, env.ca, NOT_SERVING)
        assert health_of(handle.port, env.ca, asps_server.LEGACY_SERVICE_NAME) == NOT_SERVING
        assert "expired" in (handle.monitor.reason or "")
        assert value(scrape(handle.metrics.port), "asps_serving") == 0
        assert value(scrape(handle.metrics.port), "asps_collateral_expiry_timestamp_seconds") < now
        shutil.copy(good, coll)
        wait_health(handle.port, env.ca, SERVING)
        coll.unlink()  # unreadable
        wait_health(handle.port, env.ca, NOT_SERVING)
        assert "failing" in (handle.monitor.reason or "")
        # the server's own input is missing: retryable for the enclave, not a verdict on its evidence
        c = Client(f"localhost:{handle.port}", env.ca)
        try:
            err = c.refused(c.request(env.evidence(ENCLAVE_1), ["master_key"])[0])
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "collateral" in err.details()
        finally:
            c.close()
        shutil.copy(good, coll)
        wait_health(handle.port, env.ca, SERVING)
        assert value(scrape(handle.metrics.port), "asps_serving") == 1
        c = Client(f"localhost:{handle.port}", env.ca)
        try:
            assert c.get(env.evidence(ENCLAVE_1), ["master_key"])[1] == {"master_key": SECRET_1.encode()}
        finally:
            c.close()
    finally:
        handle.stop(0)


def test_soak_small_zero_errors_and_bounded_rss(env, bao, tmp_path):
    """bench/soak.py's load, scaled down: 1,500 attestations at 16 callers against a subprocess
    server reading OpenBao. Zero errors; RSS growth is printed and only loosely bounded here (the
    10 % criterion belongs to the full soak, where the warm-up is a small part of the run)."""
    metrics_port, grpc_port = free_port(), free_port()
    senv, ca, sim_dir, names, expected = soak.setup(
        tmp_path, bao, metrics_port=metrics_port, grpc_port=grpc_port
    )
    server = soak.SoakServer(tmp_path, senv)
    try:
        result, rss_cp, rss_end, elapsed = soak.drive(
            f"localhost:{grpc_port}",
            ca,
            sim_dir,
            total=1500,
            callers=16,
            procs=0,
            names=names,
            expected=expected,
            server_pid=server.proc.pid,
            checkpoint=400,
        )
        m = scrape(metrics_port)
    finally:
        rc = server.stop()
    n = sum(result.results.values())
    growth = (rss_end - rss_cp) / rss_cp
    print(
        f"\nsmall soak: {n} in {elapsed:.1f} s ({n / elapsed:.0f}/s), RSS after 400 {rss_cp} KiB, "
        f"after {n} {rss_end} KiB ({growth:+.1%})"
    )
    assert dict(result.results) == {"OK": 1500}
    assert (
        value(m, "asps_attestations_total", protocol="asps.v1", result="granted", code="OK", step="none",
              tee="sgx")
        == 1500
    )
    assert value(m, "asps_kms_requests_total", result="ok") == 1500
    assert growth < 0.5, f"server RSS grew {growth:.0%} over 1,100 attestations"
    assert rc == 0
    lines = server.log_path.read_text().splitlines()
    assert_no_secret_in(lines, [*FORBIDDEN, *expected.values()])


def test_zz_no_secret_or_vault_token_in_any_log_line(logs):
    """Every line the in-process servers of this module logged (KMS refusals, collateral expiry and
    recovery included) is free of every secret value and Vault token used here."""
    assert len(FORBIDDEN) > 1, "no Vault token was recorded: the search would miss them"
    assert_no_secret_in(logs.lines, FORBIDDEN)
