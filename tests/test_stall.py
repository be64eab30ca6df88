"""Issue 11: no peer can stall the service by waiting. Body-less streams, slow senders, silent and idle
connections, ping floods, too many streams or calls: each is bounded, and a legitimate enclave still
attests while they are held. The attacks are made at the HTTP/2 frame level (tests/h2raw.py) over real
TLS against a real in-process server; the legitimate side is a real gRPC client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import urllib.request
from concurrent import futures

import grpc
import h2raw
import pytest
from asps_testkit import (  # noqa: F401  (fixtures: env, ev1, logs)
    ENCLAVE_1,
    ENCLAVE_UNKNOWN,
    SERVING,
    Client,
    health_of,
    module_env,
    module_ev1,
    module_logs,
    write_policy,
)

import asps_client
import asps_pb2
import asps_server
import asps_wire

pytestmark = pytest.mark.usefixtures("logs")

THREADS = 4
GET_SECRETS = "/asps.v1.SecretProvision/GetSecrets"
GET_CHALLENGE = "/asps.v1.SecretProvision/GetChallenge"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def policy(env):
    doc = {"kms": "none", "app_list": [{"id": "app1", "mr_enclave": ENCLAVE_1.hex(), "secrets": {"k": "v1"}}]}
    return write_policy(env.tmp / "stall_policy.json", doc)


def start(env, **bounds) -> asps_server.ServerHandle:
    config = env.config(policy(env), threads=THREADS, bounds=asps_server.Bounds(**bounds), metrics_port=0)
    return asps_server.serve(config)


@pytest.fixture(scope="module")
def patient(env):
    """A server whose receive limit is long: whatever the attackers open stays open during a test."""
    handle = start(env, receive_timeout=60, idle_timeout=60)
    yield handle
    handle.stop(0)


@pytest.fixture(scope="module")
def strict(env):
    """A server with short bounds, to watch each one act."""
    handle = start(
        env,
        receive_timeout=1.0,
        handshake_timeout=1.0,
        idle_timeout=1.5,
        max_streams=8,
        min_ping_interval=60,
        ping_strikes=2,
    )
    yield handle
    handle.stop(0)


def attest(client: Client, ev, deadline: float = 2.0) -> str:
    """Challenge and secrets, each under `deadline`: DEADLINE_EXCEEDED if the server stalls."""
    token = client.stub.GetChallenge(asps_pb2.ChallengeRequest(), timeout=deadline).token
    sig = asps_wire.sign_transcript(ev.private_key, asps_wire.transcript(token, ev.cert_der, ["k"]))
    req = asps_pb2.SecretsRequest(evidence=ev.cert_der, token=token, names=["k"], signature=sig)
    reply = client.stub.GetSecrets(req, timeout=deadline)
    assert asps_client.open_bundle(ev.private_key, reply.sealed, token) == {"k": b"v1"}
    return reply.app_id


def metric(handle, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics.port}/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


def test_bodyless_streams_and_silent_connections_hold_nothing(patient, env, ev1):
    """Four times the pool of streams that send headers and never a body, on one connection, plus 64
    silent TLS connections: challenge and secrets still answer within 2 s, several times, and so
    does health. (The thread-per-call server gave every pool thread to the first four streams.)"""
    client = Client(f"localhost:{patient.port}", env.ca)
    attest(client, ev1, deadline=10)  # warm: channel, evidence cache
    attacker = h2raw.RawH2("127.0.0.1", patient.port, env.ca)
    silent = [h2raw.SilentTls("127.0.0.1", patient.port) for _ in range(64)]
    try:
        paths = [GET_SECRETS, GET_CHALLENGE, HEALTH_CHECK, "/secretmanager.SecretManger/GetSecret"]
        streams = [attacker.open_stream(paths[i % len(paths)]) for i in range(4 * THREADS)]
        attacker.pump(0.5)
        for _ in range(5):
            assert attest(client, ev1) == "app1"
            assert health_of(patient.port, env.ca) == SERVING
        # the attack was in place all along: no stream was ended, no connection closed
        assert not attacker.eof
        assert not [f for f in attacker.frames if f.stream in streams and f.type == h2raw.RST_STREAM]
        assert not any(s.closed_within(0.01) for s in silent[:4])
    finally:
        attacker.close()
        for s in silent:
            s.close()
        client.close()


def test_slow_sender_is_cut_off_at_the_receive_limit(strict, env, ev1):
    attacker = h2raw.RawH2("127.0.0.1", strict.port, env.ca)
    try:
        slow = attacker.open_stream(GET_SECRETS)
        attacker.send_data(slow, h2raw.grpc_message(b"\x0a" * 200)[:40])  # 40 of 205 bytes, then nothing
        bodyless = attacker.open_stream(HEALTH_CHECK)
        for stream in (slow, bodyless):
            end = attacker.stream_ended(stream, 15)
            assert end is not None, f"stream {stream} still open past the receive limit"
        assert not attacker.eof  # the connection stays usable; only the calls ended
        trailers = [f for f in attacker.frames if f.stream == slow and f.type == h2raw.HEADERS]
        assert trailers, "no gRPC status was sent for the slow call"
    finally:
        attacker.close()
    client = Client(f"localhost:{strict.port}", env.ca)
    try:
        assert attest(client, ev1, deadline=10) == "app1"  # a normal call is not touched by the limit
    finally:
        client.close()


def test_receive_limit_answers_deadline_exceeded_to_a_real_client(strict, env):
    """A grpc client that sends headers and holds its request stream open gets DEADLINE_EXCEEDED
    from the server, with the limit named."""
    with grpc.secure_channel(f"localhost:{strict.port}", grpc.ssl_channel_credentials(env.ca)) as ch:
        call = ch.stream_unary(GET_CHALLENGE, request_serializer=lambda m: m, response_deserializer=bytes)
        held = threading.Event()

        def never():
            held.wait(30)
            return
            yield  # a generator that yields nothing until released

        try:
            with pytest.raises(grpc.RpcError) as e:
                call(never(), timeout=20)
        finally:
            held.set()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
    assert "--receive-timeout" in e.value.details()


def test_idle_and_silent_connections_are_closed(strict):
    idle = h2raw.RawH2("127.0.0.1", strict.port, None)
    tls = h2raw.SilentTls("127.0.0.1", strict.port)
    tcp = h2raw.SilentTcp("127.0.0.1", strict.port)
    try:
        assert idle.closed_within(20), "an idle HTTP/2 connection stayed open past --idle-timeout"
        assert any(f.type == h2raw.GOAWAY for f in idle.frames)
        assert tls.closed_within(20), "a TLS connection without HTTP/2 stayed open"
        assert tcp.closed_within(20), "a TCP connection without TLS stayed open past --handshake-timeout"
    finally:
        for c in (idle, tls, tcp):
            c.close()


def test_streams_per_connection_are_bounded(strict, env):
    attacker = h2raw.RawH2("127.0.0.1", strict.port, env.ca)
    try:
        attacker.pump(0.5)
        assert attacker.settings().get(h2raw.SETTINGS_MAX_CONCURRENT_STREAMS) == 8
        streams = [attacker.open_stream(GET_SECRETS) for _ in range(12)]
        for stream in streams[8:]:
            refused = attacker.stream_ended(stream, 10)
            assert refused is not None, "a stream beyond --max-streams was accepted"
            assert (refused.type, refused.error_code) == (h2raw.RST_STREAM, h2raw.REFUSED_STREAM)
        assert not [f for f in attacker.frames if f.stream in streams[:8] and f.type == h2raw.RST_STREAM]
    finally:
        attacker.close()


def test_ping_flood_is_sent_away(strict, env):
    attacker = h2raw.RawH2("127.0.0.1", strict.port, env.ca)
    try:
        attacker.pump(0.2)
        for _ in range(10):
            attacker.ping()
        goaway = attacker.wait_for(lambda f: f.type == h2raw.GOAWAY, 10)
        assert goaway is not None, "ten pings without data drew no GOAWAY"
        assert goaway.error_code == 0xB  # ENHANCE_YOUR_CALM ("too_many_pings")
    finally:
        attacker.close()


def test_connection_age_bounds_a_busy_connection(env):
    handle = start(
        env, receive_timeout=1.0, idle_timeout=60, max_connection_age=2.0, connection_age_grace=1.0
    )
    attacker = h2raw.RawH2("127.0.0.1", handle.port, env.ca)
    try:
        for _ in range(60):  # never idle: a new body-less stream every 0.25 s
            if attacker.eof:
                break
            attacker.open_stream(GET_CHALLENGE)
            attacker.pump(0.25)
        assert any(f.type == h2raw.GOAWAY for f in attacker.frames), "no GOAWAY past --max-connection-age"
        assert attacker.closed_within(10)
    finally:
        attacker.close()
        handle.stop(0)


def test_open_calls_are_bounded_with_resource_exhausted(env):
    handle = start(env, receive_timeout=30, max_calls=4)
    attacker = h2raw.RawH2("127.0.0.1", handle.port, env.ca)
    client = Client(f"localhost:{handle.port}", env.ca)
    try:
        for _ in range(4):
            attacker.open_stream(GET_CHALLENGE)
        attacker.pump(0.5)
        with pytest.raises(grpc.RpcError) as e:
            client.stub.GetChallenge(asps_pb2.ChallengeRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    finally:
        attacker.close()
        client.close()
        handle.stop(0)


def test_work_pool_sheds_beyond_its_limit_at_once():
    pool = asps_server.WorkPool(threads=1, limit=2)
    release = threading.Event()

    async def scenario():
        first = asyncio.ensure_future(pool.run(lambda: release.wait(30)))
        second = asyncio.ensure_future(pool.run(lambda: "queued"))
        await asyncio.sleep(0)
        with pytest.raises(asps_server.Busy):
            await pool.run(lambda: "shed")
        assert pool.admitted == 2 and pool.shed == 1
        release.set()
        assert await first is True and await second == "queued"
        assert pool.admitted == 0
        assert await pool.run(lambda: "again") == "again"

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        pool.shutdown()


def test_refused_requests_leave_the_outstanding_tokens_alone(patient, env, ev1):
    """1,000 genuine quotes the policy refuses (an unknown enclave), from 8 callers at once: the
    replay cache does not grow, health answers meanwhile, and a known enclave still attests."""
    unknown = env.evidence(ENCLAVE_UNKNOWN)
    client = Client(f"localhost:{patient.port}", env.ca)
    before = metric(patient, "asps_outstanding_tokens")

    def refused(_i: int) -> grpc.StatusCode:
        token = client.challenge()
        sig = asps_wire.sign_transcript(
            unknown.private_key, asps_wire.transcript(token, unknown.cert_der, ["k"])
        )
        req = asps_pb2.SecretsRequest(evidence=unknown.cert_der, token=token, names=["k"], signature=sig)
        with pytest.raises(grpc.RpcError) as e:
            # a generous deadline: on a machine loaded by other work a refusal may queue for a while,
            # and what this test is about is the code and the token count, not the time
            client.stub.GetSecrets(req, timeout=120)
        return e.value.code()

    try:
        with futures.ThreadPoolExecutor(8) as callers:
            pending = callers.map(refused, range(1000))
            assert health_of(patient.port, env.ca) == SERVING
            codes = list(pending)
        assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED}
        assert metric(patient, "asps_outstanding_tokens") == before
        assert attest(client, ev1, deadline=10) == "app1"
        assert metric(patient, "asps_outstanding_tokens") == before + 1
    finally:
        client.close()


def test_every_bound_is_a_flag_with_an_environment_twin(monkeypatch):
    monkeypatch.setenv("ASPS_RECEIVE_TIMEOUT", "2.5")
    monkeypatch.setenv("ASPS_MAX_STREAMS", "7")
    args = asps_server.build_parser().parse_args(["--max-calls", "99", "--max-streams", "9"])
    bounds = asps_server.config_from_args(args).bounds
    assert (bounds.receive_timeout, bounds.max_streams, bounds.max_calls) == (2.5, 9, 99)
    assert set(asps_server._BOUND_HELP) == {f.name for f in dataclasses.fields(asps_server.Bounds)}
    with pytest.raises(asps_server.StartupError, match="--receive-timeout"):
        asps_server.Bounds(receive_timeout=0).check()


def test_health_watch_and_reflection_run_through_the_receive_limit(env):
    """Server-streaming health Watch and (stream-stream) reflection work on the aio server; Watch hears
    NOT_SERVING when the server drains."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    config = env.config(policy(env), threads=THREADS, reflection=True)
    handle = asps_server.serve(config)
    stopped = False
    try:
        with grpc.secure_channel(f"localhost:{handle.port}", grpc.ssl_channel_credentials(env.ca)) as ch:
            listed = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            names = {s.name for r in listed for s in r.list_services_response.service}
            assert asps_server.SERVICE_NAME in names
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service=asps_server.SERVICE_NAME), timeout=20
            )
            assert next(watch).status == SERVING
            threading.Thread(target=handle.stop, args=(1,), daemon=True).start()
            stopped = True
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        if not stopped:
            handle.stop(0)
        handle.wait(30)


def test_a_full_work_pool_sheds_get_secrets_while_challenges_and_health_answer(env, ev1):
    """Over gRPC: with the pool's one admitted slot taken, GetSecrets is refused RESOURCE_EXHAUSTED
    at once (not queued), GetChallenge and health still answer, and the metrics count the shed call."""
    handle = start(env, max_inflight=1)
    client = Client(f"localhost:{handle.port}", env.ca)
    release = threading.Event()
    try:
        held = asyncio.run_coroutine_threadsafe(handle.pool.run(lambda: release.wait(30)), handle.loop.loop)
        req, _token = client.request(ev1, ["k"])
        err = client.refused(req)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in err.details()
        assert health_of(handle.port, env.ca) == SERVING
        assert metric(handle, "asps_work_pool_shed_total") == 1
        assert metric(handle, "asps_work_pool_admitted") == 1
        release.set()
        assert held.result(10) is True
        assert attest(client, ev1, deadline=10) == "app1"
    finally:
        release.set()
        client.close()
        handle.stop(0)


def test_long_lived_calls_cannot_take_the_slots_attestations_need(env, ev1):
    """Health Watch calls stay open after their one request; an unauthenticated peer opening many of
    them gets RESOURCE_EXHAUSTED past --max-streaming-calls, while challenges and attestations (and
    Check) keep their slots within --max-calls."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    handle = start(env, max_calls=32, max_streaming_calls=8, max_streams=32, receive_timeout=1.0)
    channels, watches = [], []
    try:
        for i in range(2):  # the attacker: its own connections, no certificate, no token
            ch = grpc.secure_channel(f"localhost:{handle.port}", grpc.ssl_channel_credentials(env.ca),
                                     options=[("grpc.use_local_subchannel_pool", 1), ("test.attacker", i)])
            channels.append(ch)
            stub = health_pb2_grpc.HealthStub(ch)
            watches += [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60) for _ in range(15)]
        held, refused = 0, 0
        for w in watches:
            try:
                assert next(w).status == SERVING
                held += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert "--max-streaming-calls" in e.details()
                refused += 1
        assert (held, refused) == (8, 22)
        client = Client(f"localhost:{handle.port}", env.ca)
        try:
            for _ in range(3):
                assert attest(client, ev1) == "app1"
            assert health_of(handle.port, env.ca) == SERVING
        finally:
            client.close()
        for w in watches:
            w.cancel()
    finally:
        for ch in channels:
            ch.close()
        handle.stop(0)


def test_a_stream_of_requests_is_held_to_the_receive_limit_message_by_message(env):
    """Reflection reads a stream of requests: one that sends none (or stops sending) is cut at the
    receive limit, as a unary call waiting for its message is."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    config = env.config(policy(env), threads=THREADS, reflection=True,
                        bounds=asps_server.Bounds(receive_timeout=1.0))
    handle = asps_server.serve(config)
    stop = threading.Event()

    def silent():
        stop.wait(30)
        yield from ()

    def one_then_silent():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        stop.wait(30)

    try:
        with grpc.secure_channel(f"localhost:{handle.port}", grpc.ssl_channel_credentials(env.ca)) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.ServerReflectionInfo(silent(), timeout=20))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--receive-timeout" in e.value.details()
            replies = stub.ServerReflectionInfo(one_then_silent(), timeout=20)
            assert asps_server.SERVICE_NAME in {s.name for s in next(replies).list_services_response.service}
            with pytest.raises(grpc.RpcError) as e:
                next(replies)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--receive-timeout" in e.value.details()  # the server's limit, not the call's deadline
    finally:
        stop.set()
        handle.stop(0)
