"""PccsCollateralSource against a small PCCS stand-in (http.server on 127.0.0.1) serving the real sample
collateral the way PCCS does: signed JSON bodies, issuer chains as URL-encoded PEM in headers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from asps_testkit import HttpStandIn, send_reply
from openbao import free_port

import dcap
import pccs
from dcap_collateral import Collateral

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "samples"
API = "/sgx/certification/v4"


class Pccs:
    """Serves one collateral bundle per FMSPC; records every request path."""

    def __init__(self, bundles: dict[str, tuple[Collateral, str]]) -> None:
        self.bundles = bundles  # fmspc hex -> (collateral, ca)
        self.requests: list[str] = []
        self.fail_with: int | None = None
        self.garbage = False
        self.root_crl_hex = True
        self.drop_header = False
        self.spaced = False
        self.delay = 0.0  # seconds before each answer (a slow but steady server)
        self.gate = threading.Event()  # cleared: every request hangs until it is set (or close)
        self.gate.set()
        pccs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                pccs.requests.append(self.path)
                pccs.gate.wait(30)
                time.sleep(pccs.delay)
                status, body, headers = pccs.answer(self.path)
                with contextlib.suppress(OSError):  # the client gave up waiting (a hanging PCCS)
                    send_reply(self, status, headers, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()

    def any_bundle(self) -> Collateral:
        return next(iter(self.bundles.values()))[0]

    def answer(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        if self.fail_with:
            return self.fail_with, b"oops", {}
        url = urllib.parse.urlsplit(path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if not url.path.startswith(API):
            return 404, b"", {}
        route = url.path[len(API) :]
        enc = urllib.parse.quote
        if route == "/tcb":
            if q.get("fmspc", "").lower() not in self.bundles:
                return 404, b"", {}
            c = self.bundles[q["fmspc"].lower()][0]
            sep = ": " if self.spaced else ":"
            body = f'{{"tcbInfo"{sep}{c.tcb_info},"signature"{sep}"{c.tcb_info_signature.hex()}"}}'
            if self.spaced:  # signature first, whitespace around: the exact tcbInfo bytes must survive
                body = f'{{ "signature" : "{c.tcb_info_signature.hex()}",\n  "tcbInfo" :  {c.tcb_info} }}'
            if self.garbage:
                body = body[: len(body) // 2]
            headers = {"Content-Type": "application/json"}
            if not self.drop_header:
                headers["TCB-Info-Issuer-Chain"] = enc(c.tcb_info_issuer_chain)
            return 200, body.encode(), headers
        if route == "/qe/identity":
            c = self.any_bundle()
            body = f'{{"enclaveIdentity":{c.qe_identity},"signature":"{c.qe_identity_signature.hex()}"}}'
            return 200, body.encode(), {"SGX-Enclave-Identity-Issuer-Chain": enc(c.qe_identity_issuer_chain)}
        if route == "/pckcrl":
            matches = [c for c, ca in self.bundles.values() if ca == q.get("ca")]
            if not matches or q.get("encoding") != "der":
                return 404, b"", {}
            return 200, matches[0].pck_crl, {"SGX-PCK-CRL-Issuer-Chain": enc(matches[0].pck_crl_issuer_chain)}
        if route == "/rootcacrl":
            crl = self.any_bundle().root_ca_crl
            return 200, (crl.hex().encode() if self.root_crl_hex else crl), {}
        return 404, b"", {}


def case(name: str) -> tuple[bytes, Collateral, dict]:
    path = SAMPLES / "real-dcap" / name if (SAMPLES / "real-dcap" / name).is_dir() else SAMPLES / name
    return (
        (path / "quote.bin").read_bytes(),
        Collateral.from_json((path / "collateral.json").read_text()),
        json.loads((path / "expected.json").read_text()),
    )


@pytest.fixture
def zk():
    quote, coll, exp = case("zkdcap-00906ed5-2025")
    server = Pccs({exp["fmspc"].lower(): (coll, "processor")})
    yield server, quote, coll, exp
    server.close()


def test_warm_verification_makes_no_request(zk):
    server, quote, coll, exp = zk
    source = pccs.PccsCollateralSource(server.url, timeout=5)
    v = dcap.Verifier(source)
    r = v.verify(quote, now=exp["now"])
    assert r.status == exp["status"] and set(r.advisory_ids) == set(exp["advisory_ids"])
    assert len(server.requests) == 4 and source.requests == 4
    paths = sorted(urllib.parse.urlsplit(p).path for p in server.requests)
    assert paths == [API + "/pckcrl", API + "/qe/identity", API + "/rootcacrl", API + "/tcb"]
    assert any("ca=processor" in p and "encoding=der" in p for p in server.requests)
    assert any(f"fmspc={exp['fmspc'].lower()}" in p.lower() for p in server.requests)
    for _ in range(3):
        assert v.verify(quote, now=exp["now"] + 60).status == exp["status"]
    assert len(server.requests) == 4 and source.requests == 4
    # the fetched bundle is byte-identical to the sample (the exact signed JSON survives)
    assert source.get(bytes.fromhex(exp["fmspc"]), "processor", exp["now"]) == coll


def test_next_update_is_honoured(zk):
    server, quote, coll, exp = zk
    source = pccs.PccsCollateralSource(server.url + API + "/")  # base with the API prefix works too
    fmspc = bytes.fromhex(exp["fmspc"])
    source.get(fmspc, "processor", exp["now"])
    assert len(server.requests) == 4
    expiry = dcap.collateral_next_update(coll)
    assert exp["now"] < expiry
    source.get(fmspc, "processor", expiry)
    assert len(server.requests) == 4
    # past nextUpdate: refetched; the PCCS still answers with the same, now expired, collateral,
    # which is a failed fetch (retryable), not handed out, and not asked again within retry_after
    with pytest.raises(dcap.CollateralUnavailable, match="past its nextUpdate"):
        source.get(fmspc, "processor", expiry + 1)
    assert len(server.requests) == 8
    for _ in range(3):
        with pytest.raises(dcap.CollateralUnavailable, match=r"past its nextUpdate .* failed [0-9.]+ s ago"):
            dcap.Verifier(source).verify(quote, now=expiry + 10)
    assert len(server.requests) == 8


def test_exact_signed_json_is_cut_out_of_spaced_bodies(zk):
    server, quote, _, exp = zk
    server.spaced = True
    server.root_crl_hex = False  # DER root CA CRL, as Intel PCS serves it
    r = dcap.Verifier(pccs.PccsCollateralSource(server.url)).verify(quote, now=exp["now"])
    assert r.status == exp["status"]


def test_platform_ca_case():
    quote, coll, exp = case("signal-svr2-00606a-2026")
    server = Pccs({exp["fmspc"].lower(): (coll, "platform")})
    try:
        r = dcap.Verifier(pccs.PccsCollateralSource(server.url)).verify(quote, now=exp["now"])
        assert r.status == exp["status"] and r.pck_ca == "platform"
        assert any("ca=platform" in p for p in server.requests)
    finally:
        server.close()


def test_http_errors(zk):
    server, _quote, _, exp = zk
    fmspc = bytes.fromhex(exp["fmspc"])
    for code, error in (
        (500, dcap.CollateralUnavailable),
        (503, dcap.CollateralUnavailable),
        (404, dcap.CollateralError),
        (400, dcap.CollateralError),
    ):
        server.fail_with = code
        with pytest.raises(error, match=str(code)):
            pccs.PccsCollateralSource(server.url).get(fmspc, "processor", exp["now"])
    server.fail_with = None
    with pytest.raises(dcap.CollateralError, match="404"):
        pccs.PccsCollateralSource(server.url).get(b"\x01" * 6, "processor", exp["now"])
    with pytest.raises(dcap.CollateralError, match="CA type"):
        pccs.PccsCollateralSource(server.url).get(fmspc, "nonsense", exp["now"])


def test_garbage_is_a_collateral_error(zk):
    server, _quote, _, exp = zk
    fmspc = bytes.fromhex(exp["fmspc"])
    server.garbage = True
    with pytest.raises(dcap.CollateralError, match="TCB info"):
        pccs.PccsCollateralSource(server.url).get(fmspc, "processor", exp["now"])
    server.garbage = False
    server.drop_header = True
    with pytest.raises(dcap.CollateralError, match="TCB-Info-Issuer-Chain"):
        pccs.PccsCollateralSource(server.url).get(fmspc, "processor", exp["now"])


def test_server_down_is_unavailable_quickly(zk):
    _, quote, _, exp = zk
    source = pccs.PccsCollateralSource(f"http://127.0.0.1:{free_port()}", timeout=2)
    start = time.monotonic()
    with pytest.raises(dcap.CollateralUnavailable, match="unreachable"):
        dcap.Verifier(source).verify(quote, now=exp["now"])
    assert time.monotonic() - start < 2


def test_silent_server_times_out():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts connections (kernel backlog) but never answers
        source = pccs.PccsCollateralSource(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
        start = time.monotonic()
        with pytest.raises(dcap.CollateralUnavailable):
            source.get(b"\0" * 6, "processor", 0)
        assert time.monotonic() - start < 5


def test_cli_verify_with_pccs(zk):
    server, _, _, exp = zk
    path = SAMPLES / "real-dcap" / "zkdcap-00906ed5-2025"
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "dcap.py"),
            "verify",
            str(path / "quote.bin"),
            "--pccs",
            server.url,
            "--now",
            str(exp["now"]),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["status"] == exp["status"]
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "dcap.py"),
            "verify",
            str(path / "quote.bin"),
            "--pccs",
            f"http://127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0 and "CollateralUnavailable" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_file_source_rereads_changed_file(tmp_path):
    _quote, coll, _exp = case("intel-sgx-v3")
    path = tmp_path / "c.json"
    path.write_text(coll.to_json())
    src = pccs.FileCollateralSource(path)
    assert src.get(b"", "processor", 0) == coll
    other = case("zkdcap-00906ed5-2025")[1]
    path.write_text(other.to_json() + "\n")
    assert src.get(b"", "processor", 0) == other
    with pytest.raises(dcap.CollateralUnavailable, match="cannot read"):
        pccs.FileCollateralSource(tmp_path / "missing.json").get(b"", "processor", 0)
    assert isinstance(pccs.open_collateral_source(str(path), None), pccs.FileCollateralSource)
    assert isinstance(pccs.open_collateral_source(None, "http://x"), pccs.PccsCollateralSource)
    with pytest.raises(dcap.DcapError):
        pccs.open_collateral_source(None, None)


# --- bounds: size of one answer, time of one whole fetch --------------------------------------------


class Streamer(HttpStandIn):
    """Answers every request with 200, `headers` and `chunk` repeated `repeat` times, with no
    Content-Length (HTTP/1.0: the body ends when the connection closes); counts the bytes it managed
    to hand to the socket."""

    def __init__(self, chunk: bytes, repeat: int, headers: dict[str, str] | None = None) -> None:
        self.sent = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    for _ in range(repeat):
                        self.wfile.write(chunk)
                        owner.sent += len(chunk)
                except OSError:
                    pass

        super().__init__(Handler)


def test_oversized_answer_without_length_is_refused_while_reading():
    """No Content-Length to refuse on: the client stops reading at the cap, not at the end of 64 MiB."""
    server = Streamer(b"{" * (1 << 16), 1024)
    try:
        with pytest.raises(dcap.CollateralError, match=r"/tcb is longer than the 2097152 bytes allowed"):
            pccs.PccsCollateralSource(server.url, timeout=10).fetch(b"\0" * 6, "processor")
        time.sleep(0.2)
        assert server.sent < 32 << 20, f"the client read on: the server sent {server.sent} bytes"
    finally:
        server.close()


def test_max_response_is_configurable_and_compressed_answers_are_refused():
    server = Streamer(b"x" * 1000, 3)
    try:
        with pytest.raises(dcap.CollateralError, match="longer than the 2000 bytes"):
            pccs.PccsCollateralSource(server.url, max_response=2000).fetch(b"\0" * 6, "processor")
    finally:
        server.close()
    # identity is asked for, so what is counted is what arrives: no decompression bomb
    server = Streamer(b"\x1f\x8b" + bytes(100), 1, {"Content-Encoding": "gzip"})
    try:
        with pytest.raises(dcap.CollateralError, match="Content-Encoding 'gzip'"):
            pccs.PccsCollateralSource(server.url).fetch(b"\0" * 6, "processor")
    finally:
        server.close()


def test_timeout_bounds_the_whole_fetch(zk):
    """Four answers of 0.4 s each: fine with timeout=3, over the deadline with timeout=1 (each one alone
    would be in time), and then the error names the endpoint it was waiting for."""
    server, _quote, coll, exp = zk
    fmspc = bytes.fromhex(exp["fmspc"])
    server.delay = 0.4
    assert pccs.PccsCollateralSource(server.url, timeout=3).fetch(fmspc, "processor") == coll
    start = time.monotonic()
    with pytest.raises(dcap.CollateralUnavailable, match=r"/sgx/certification/v4/(pckcrl|rootcacrl)"):
        pccs.PccsCollateralSource(server.url, timeout=1.0).fetch(fmspc, "processor")
    assert time.monotonic() - start < 1.3


# --- single flight and back-off: a PCCS that hangs or fails costs one fetch, not one per caller ------


def concurrently(n: int, call) -> list[tuple[float, object]]:
    """Run `call` in n threads released together; (seconds taken, result or exception) for each."""
    barrier = threading.Barrier(n)
    results: list[tuple[float, object]] = [(0.0, None)] * n

    def run(i: int) -> None:
        barrier.wait()
        start = time.monotonic()
        try:
            out: object = call()
        except Exception as exc:  # the test inspects what each caller got
            out = exc
        results[i] = (time.monotonic() - start, out)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_hanging_pccs_gets_one_fetch_from_16_concurrent_verifications(zk):
    """16 threads (the server's pool) verify at once against a PCCS that never answers: one request
    reaches it, and every caller is answered CollateralUnavailable within the source's timeout.
    retry_after=0: no back-off, so the count shows the single flight alone."""
    server, quote, _, exp = zk
    server.gate.clear()
    timeout = 2.0
    source = pccs.PccsCollateralSource(server.url, timeout=timeout, retry_after=0)
    verifier = dcap.Verifier(source)
    results = concurrently(16, lambda: verifier.verify(quote, now=exp["now"]))
    assert all(isinstance(out, dcap.CollateralUnavailable) for _, out in results), results
    assert max(took for took, _ in results) < timeout + 0.5, results
    assert len(server.requests) == 1 and source.requests == 1, server.requests
    # the leader's reason, or (a caller that started a hair after it) its own wait running out
    reasons = r"unreachable|did not (answer in full|finish) within 2 s"
    assert all(re.search(reasons, str(out)) for _, out in results), results


def test_slow_pccs_serves_16_concurrent_callers_with_one_fetch(zk):
    server, _quote, coll, exp = zk
    server.delay = 0.25  # one fetch: ~1 s
    source = pccs.PccsCollateralSource(server.url, timeout=5, retry_after=0)
    fmspc = bytes.fromhex(exp["fmspc"])
    results = concurrently(16, lambda: source.get(fmspc, "processor", exp["now"]))
    assert all(out == coll for _, out in results), results
    assert len({id(out) for _, out in results}) == 1  # one fetched object, shared
    assert len(server.requests) == 4 and source.requests == 4


def test_failed_fetch_is_not_retried_within_retry_after(zk):
    """After a failure, callers within retry_after are answered at once with when and why, with no
    request; after it the source asks again and, the PCCS being back, succeeds."""
    server, quote, coll, exp = zk
    fmspc = bytes.fromhex(exp["fmspc"])
    source = pccs.PccsCollateralSource(server.url, timeout=5, retry_after=1.0)
    server.fail_with = 503
    with pytest.raises(dcap.CollateralUnavailable, match="HTTP 503"):
        source.get(fmspc, "processor", exp["now"])
    failed_at = time.monotonic()
    assert len(server.requests) == 1
    server.fail_with = None  # back already, but not asked until retry_after has passed
    for _ in range(3):
        start = time.monotonic()
        with pytest.raises(dcap.CollateralUnavailable, match=r"^TCB info: HTTP 503 .* failed [0-9.]+ s ago"):
            dcap.Verifier(source).verify(quote, now=exp["now"])
        assert time.monotonic() - start < 0.5
    assert len(server.requests) == 1 and source.requests == 1
    time.sleep(max(0.0, failed_at + 1.1 - time.monotonic()))
    assert dcap.Verifier(source).verify(quote, now=exp["now"]).status == exp["status"]
    assert len(server.requests) == 5
    assert source.get(fmspc, "processor", exp["now"]) == coll and len(server.requests) == 5


def test_back_off_keeps_the_error_class_and_never_hides_fresh_or_serves_expired(zk):
    """Garbage (CollateralError) backs off too and stays a CollateralError (an unknown FMSPC is the
    platform's problem, not an outage); fresh cached collateral is served during a back-off, expired
    never is; retry_after=0 asks every time."""
    server, _quote, coll, exp = zk
    fmspc = bytes.fromhex(exp["fmspc"])
    source = pccs.PccsCollateralSource(server.url, timeout=5, retry_after=30)
    assert source.get(fmspc, "processor", exp["now"]) == coll
    assert len(server.requests) == 4
    past = dcap.collateral_next_update(coll) + 1
    server.garbage = True
    for _ in range(2):
        with pytest.raises(dcap.CollateralError, match="TCB info"):
            source.get(fmspc, "processor", past)
    assert len(server.requests) == 5  # the second one asked nothing
    server.garbage = False
    assert source.get(fmspc, "processor", exp["now"]) == coll  # still fresh at that time: served
    with pytest.raises(dcap.CollateralError, match="last fetch failed"):
        source.get(fmspc, "processor", past)  # expired: not served, and still backing off
    assert len(server.requests) == 5
    server.fail_with = 500
    eager = pccs.PccsCollateralSource(server.url, timeout=5, retry_after=0)
    for _ in range(2):
        with pytest.raises(dcap.CollateralUnavailable, match="HTTP 500"):
            eager.get(fmspc, "processor", exp["now"])
    assert len(server.requests) == 7


# --- the warning about a trusted root that is not Intel's: once per tool run -------------------------


@pytest.fixture
def sim_pccs(sim_platform):
    server = Pccs({sim_platform.fmspc.hex(): (sim_platform.collateral(), "processor")})
    yield server
    server.close()


def warnings_in(stderr: str) -> int:
    return stderr.count("not the Intel SGX Root CA")


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / tool), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_cli_tools_warn_once_about_a_root_that_is_not_intels(sim_platform, sim_pccs, tmp_path):
    root = str(sim_platform.directory / "root_ca.pem")
    quote = tmp_path / "q.bin"
    quote.write_bytes(sim_platform.make_quote(bytes(64)))
    p = run_tool("dcap.py", "verify", str(quote), "--pccs", sim_pccs.url, "--root-ca", root)
    assert p.returncode == 0, p.stderr
    assert warnings_in(p.stderr) == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    sim_dir = str(sim_platform.directory)
    p = run_tool("ratls.py", "make", "--provider", "sim", "--sim-dir", sim_dir, "--cert", cert, "--key", key)
    assert p.returncode == 0, p.stderr
    p = run_tool("ratls.py", "verify", cert, "--pccs", sim_pccs.url, "--root-ca", root, "--json")
    assert json.loads(p.stdout)["identity"]["tcb_status"] == "UpToDate", p.stderr
    assert warnings_in(p.stderr) == 1, p.stderr


def test_a_process_that_logs_sees_the_root_warning_once(tmp_path, capsys, caplog):
    """With logging configured (as the server does), load_root_ca's stderr line and the Verifier's log
    record do not both appear; a Verifier on its own logs once per root, not once per instance."""
    coll = case("intel-sgx-v3")[1]
    caplog.set_level(logging.WARNING, logger="dcap")
    path = tmp_path / "root.der"
    path.write_bytes(os.urandom(64))  # any root that is not Intel's (never parsed here)
    root = dcap.load_root_ca(str(path))
    dcap.Verifier(coll, root_ca=root)
    dcap.Verifier(coll, root_ca=root)
    assert warnings_in(capsys.readouterr().err) == 1
    assert warnings_in(caplog.text) == 0
    other = os.urandom(64)
    dcap.Verifier(coll, root_ca=other)
    dcap.Verifier(coll, root_ca=other)
    assert warnings_in(caplog.text) == 1 and warnings_in(capsys.readouterr().err) == 0


# --- an answer that does not verify is not kept until its (unverified) nextUpdate ----------------


def flip_tcb_signature(c: Collateral) -> Collateral:
    sig = bytearray(c.tcb_info_signature)
    sig[10] ^= 0x01
    return dataclasses.replace(c, tcb_info_signature=bytes(sig))


def test_a_poisoned_answer_is_dropped_backed_off_and_refetched(sim_platform):
    """A PCCS answer whose TCB info signature does not verify: the verification fails with the reason,
    retryable (CollateralUnavailable caused by the VerificationError naming the check); the source
    drops it and backs off (no request within retry_after); the same answer fetched again is refused
    without being handed out; once the PCCS is fixed the next fetch verifies."""
    sim = sim_platform
    good = sim.collateral()
    server = Pccs({sim.fmspc.hex(): (flip_tcb_signature(good), "processor")})
    try:
        source = pccs.PccsCollateralSource(server.url, timeout=5, retry_after=1.0)
        verifier = dcap.Verifier(source, root_ca=sim.root_ca_der)
        quote = sim.make_quote(bytes(64))
        with pytest.raises(dcap.CollateralUnavailable, match=r"^tcb_info_signature: .*dropped") as err:
            verifier.verify(quote)
        failed_at = time.monotonic()
        cause = err.value.__cause__
        assert isinstance(cause, dcap.VerificationError) and cause.check == "tcb_info_signature"
        assert len(server.requests) == 4
        for _ in range(3):  # backing off: the reason at once, no request
            with pytest.raises(dcap.CollateralUnavailable, match=r"^tcb_info_signature: .* s ago"):
                verifier.verify(quote)
        assert len(server.requests) == 4 and source.requests == 4
        # after retry_after the PCCS is asked again; it still serves the same bad answer: refused by the
        # source itself (what keeps the server's health NOT_SERVING), and backed off again
        time.sleep(max(0.0, failed_at + 1.1 - time.monotonic()))
        with pytest.raises(dcap.CollateralUnavailable, match=r"^tcb_info_signature"):
            source.get(sim.fmspc, "processor", int(time.time()))
        refetched_at = time.monotonic()
        assert len(server.requests) == 8
        with pytest.raises(dcap.CollateralUnavailable, match=r"^tcb_info_signature: .* failed"):
            verifier.verify(quote)
        assert len(server.requests) == 8
        server.bundles = {sim.fmspc.hex(): (good, "processor")}  # the PCCS is fixed
        time.sleep(max(0.0, refetched_at + 1.1 - time.monotonic()))
        assert verifier.verify(quote).status == "UpToDate"
        assert len(server.requests) == 12
        assert verifier.verify(quote).status == "UpToDate" and len(server.requests) == 12  # warm again
    finally:
        server.close()


def test_discard_keeps_a_newer_answer_fetched_meanwhile(sim_platform):
    """A verification that fails on collateral B while another caller has already refreshed the entry
    to C (good) must not drop C nor start a back-off."""
    sim = sim_platform
    now = int(time.time())
    bad = flip_tcb_signature(sim.build_collateral(issue=now - 3600, validity=3600 + 60))  # nextUpdate now+60
    server = Pccs({sim.fmspc.hex(): (bad, "processor")})
    try:
        source = pccs.PccsCollateralSource(server.url, timeout=5, retry_after=30)
        b = source.get(sim.fmspc, "processor", now)
        server.bundles = {sim.fmspc.hex(): (sim.collateral(), "processor")}
        c = source.get(sim.fmspc, "processor", now + 120)  # B expired in the cache: refreshed
        assert c is not b and len(server.requests) == 8
        assert source.discard(sim.fmspc, "processor", b, "tcb_info_signature: late verdict") is True
        assert source.get(sim.fmspc, "processor", now + 120) is c and len(server.requests) == 8
        verifier = dcap.Verifier(source, root_ca=sim.root_ca_der)
        assert verifier.verify(sim.make_quote(bytes(64)), now=now + 120).status == "UpToDate"
        assert len(server.requests) == 8  # no back-off started, nothing refetched
        # the same verdict on the object in use does drop it (and backs off)
        assert source.discard(sim.fmspc, "processor", c, "tcb_info_signature: test") is True
        with pytest.raises(dcap.CollateralUnavailable, match=r"^tcb_info_signature: test"):
            source.get(sim.fmspc, "processor", now + 120)
        assert len(server.requests) == 8
    finally:
        server.close()


class Watching:
    """A source wrapper like the server's CollateralWatch: only .get and the wrapped .source."""

    def __init__(self, source: object) -> None:
        self.source = source
        self.lookups = 0

    def get(self, fmspc: bytes, ca: str, now: int | None = None) -> Collateral:
        self.lookups += 1
        return self.source.get(fmspc, ca, now)


def test_a_wrapped_source_is_told_too(sim_platform):
    sim = sim_platform
    server = Pccs({sim.fmspc.hex(): (flip_tcb_signature(sim.collateral()), "processor")})
    try:
        source = pccs.PccsCollateralSource(server.url, timeout=5, retry_after=30)
        verifier = dcap.Verifier(Watching(source), root_ca=sim.root_ca_der)
        quote = sim.make_quote(bytes(64))
        with pytest.raises(dcap.CollateralUnavailable, match=r"^tcb_info_signature"):
            verifier.verify(quote)
        with pytest.raises(dcap.CollateralUnavailable, match=r"^tcb_info_signature: .* failed"):
            source.get(sim.fmspc, "processor", int(time.time()))  # dropped, backing off
        assert len(server.requests) == 4 and verifier.source.lookups == 1
    finally:
        server.close()


def test_file_source_is_unaffected(sim_platform, tmp_path):
    """A file is the operator's: a bad one fails with its VerificationError (no back-off, nothing
    dropped), and a fixed file is used at once."""
    sim = sim_platform
    path = tmp_path / "collateral.json"
    path.write_text(flip_tcb_signature(sim.collateral()).to_json())
    source = pccs.FileCollateralSource(path)
    verifier = dcap.Verifier(source, root_ca=sim.root_ca_der)
    quote = sim.make_quote(bytes(64))
    for _ in range(2):
        with pytest.raises(dcap.VerificationError) as err:
            verifier.verify(quote)
        assert err.value.check == "tcb_info_signature"
    assert source.discard(sim.fmspc, "processor", source.get(), "tcb_info_signature: test") is False
    path.write_text(sim.collateral().to_json() + "\n")
    assert verifier.verify(quote).status == "UpToDate"


def test_a_revoked_pck_ca_condemns_the_platform_not_the_collateral(sim_platform):
    """Collateral whose root CA CRL revokes the Processor CA is Intel's verdict on every platform under
    that CA: the quote is refused (intermediate_revoked), and the collateral is kept, not discarded
    and refetched as if the PCCS had served something broken."""
    sim = sim_platform
    now = int(time.time())
    revoked = sim.build_collateral(issue=now - 60, revoked_ca_serials=[sim.serial("processor_ca")])
    server = Pccs({sim.fmspc.hex(): (revoked, "processor")})
    try:
        source = pccs.PccsCollateralSource(server.url, timeout=5, retry_after=30)
        verifier = dcap.Verifier(source, root_ca=sim.root_ca_der)
        quote = sim.make_quote(bytes(64))
        for _ in range(2):
            with pytest.raises(dcap.VerificationError) as err:
                verifier.verify(quote)
            assert err.value.check == "intermediate_revoked"
            assert not isinstance(err.value, dcap.CollateralUnavailable)
        assert len(server.requests) == 4  # one fetch, still cached: nothing was discarded
        assert source.get(sim.fmspc, "processor", now) is not None
    finally:
        server.close()
