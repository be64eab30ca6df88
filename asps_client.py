"""ASPS client: runs inside the enclave, proves what it is, and receives its secrets.

    key pair -> RA-TLS certificate (quote binding the key) -> GetChallenge -> sign the transcript
    -> GetSecrets -> open the HPKE-sealed bundle with the private key

Who may import it: nothing in the project (it is the entry point); tests and embedders call
`get_secrets(...)`.  It imports only the enclave side: asps_wire (the protocol), ratls_attest (the
certificate), attester (the quote), dcap_quote (the format, through those) and the generated stubs,
so copying exactly those files (ENCLAVE_FILES in tests/test_layout.py, the lists of
build_occlum_instance.sh and asps_client.manifest.template) with the requirements into an Occlum or
Gramine image is enough; no verifier, collateral, policy, KMS, simulator or server code travels.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

import asps_pb2
import asps_pb2_grpc
import asps_wire
import attester
import ratls_attest
from dcap_quote import DcapError

if TYPE_CHECKING:  # the command line's modules load with the command line, not with the library
    import argparse

# Protocol constants: see the README's "Protocol" section (the server has the same ones).
MAX_REPLY_BYTES = 4 * 1024 * 1024
MAX_REQUEST_BYTES = 256 * 1024
SERVICE_NAME = "asps.v1.SecretProvision"
REPLICA_METADATA = "asps-replica"  # trailing metadata: which server replica answered
LB_POLICIES = ("round_robin", "pick_first")

EXIT_OK = 0
EXIT_ERROR = 1  # unexpected failure (a bug: please report)
EXIT_USAGE = 2  # bad command line or unreadable local file
EXIT_UNREACHABLE = 3  # server unreachable, TLS failed (wrong --ca?), or deadline exceeded
EXIT_REFUSED = 4  # the server refused: evidence, signature, token, or policy (reason printed)
EXIT_NOT_GRANTED = 5  # a requested secret is not granted to this enclave
EXIT_BAD_REPLY = 6  # the reply could not be opened or is not what was asked for
EXIT_NO_EVIDENCE = 7  # this machine could not produce a quote (no SGX provider, sim misconfigured)
EXIT_RETRY_LATER = 8  # the server is up but its KMS or collateral source is not: retry later

EXIT_CODES_HELP = """\
exit codes:
  0  secrets received
  1  unexpected error (a bug)
  2  usage error, or a local file that cannot be read or written safely (--ca, --out-dir)
  3  server unreachable, TLS handshake failed (wrong --ca?) or deadline exceeded
  4  refused by the server (evidence, signature, challenge or policy); the reason is printed
  5  a requested secret is not granted to this enclave
  6  bad reply (cannot be opened, or not the secrets asked for)
  7  no evidence: no quote provider works here (try --provider)
  8  the server's KMS or collateral source is unavailable; retry later
"""


class ClientError(Exception):
    """A failure with its exit code; `status` and `reason` come from the server when it answered."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, status: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class UsageError(ClientError):
    exit_code = EXIT_USAGE


class OutDirError(UsageError):
    """--out-dir is not private to this user, or a secret cannot be written into it (a local error)."""


class Unreachable(ClientError):
    exit_code = EXIT_UNREACHABLE


class Refused(ClientError):
    exit_code = EXIT_REFUSED


class NotGranted(ClientError):
    exit_code = EXIT_NOT_GRANTED


class BadReply(ClientError):
    exit_code = EXIT_BAD_REPLY


class NoEvidence(ClientError):
    exit_code = EXIT_NO_EVIDENCE


class RetryLater(ClientError):
    exit_code = EXIT_RETRY_LATER


@dataclass(frozen=True)
class Evidence:
    """An RA-TLS certificate (DER) and the private key it binds."""

    cert_der: bytes
    private_key: Any


@dataclass(frozen=True)
class Result:
    """What one attestation got; `replica` is the server's own name for itself (`asps-replica`
    trailing metadata, e.g. its --replica-id or hostname:port), `attempts` counts attestations."""

    app_id: str
    secrets: dict[str, bytes]
    host: str
    replica: str = ""
    attempts: int = 1


# --- protocol pieces (each also usable by clients embedding this module) -------------------------------


def open_bundle(private_key: Any, sealed: bytes, token: bytes) -> dict[str, bytes]:
    """The secrets sealed to `private_key` for this exchange (asps_wire.open_sealed), or BadReply."""
    try:
        return asps_wire.open_sealed(None, private_key, sealed, token)
    except asps_wire.OpenError as e:
        raise BadReply(str(e)) from None


# --- evidence -----------------------------------------------------------------------------------------


def make_evidence(
    provider: str | None = None,
    *,
    key_type: str = "p256",
    fmt: str | None = None,
    **provider_options: Any,
) -> Evidence:
    """A fresh key and RA-TLS certificate from the named (or detected) quote provider."""
    try:
        prov = attester.get_provider(provider, **provider_options)
    except DcapError as e:
        raise NoEvidence(f"no quote provider: {e}") from None
    except ValueError as e:  # an option the provider does not know, e.g. the sim's TCB level
        raise UsageError(f"{provider} provider: {e}") from None
    if fmt is None:  # a TD's evidence is DICE tagged evidence (CCC interoperable RA-TLS)
        fmt = {"gramine": "gramine", "tdx": "dice", "sim-td": "dice"}.get(getattr(prov, "name", ""), "cczoo")
    try:
        cert_der, key = ratls_attest.make_certificate(prov, key_type=key_type, fmt=fmt)
    except DcapError as e:
        raise NoEvidence(f"quote generation failed: {e}") from None
    return Evidence(cert_der, key)


# --- the call -----------------------------------------------------------------------------------------
#
# Several replicas: gRPC balances, not us. Several --host addresses become one channel whose target
# lists them all (gRPC's static "ipv4:"/"ipv6:" resolver) with the load-balancing policy in the
# channel's service config: round_robin spreads attestations and skips replicas whose connection
# failed; pick_first sticks to the first that answers and fails over in list order. One DNS name with
# several A records works the same way through gRPC's DNS resolver. GetChallenge is retried by gRPC
# itself on UNAVAILABLE (it does no work on the server); GetSecrets is not (only gRPC's transparent
# retry of a call that never reached a server applies), because the replica that answered
# UNAVAILABLE may already have redeemed the token. Instead the whole attestation is retried
# once with a fresh challenge, on the balancer's next pick: never a replica whose connection failed
# (killed, restarting, drained); with round_robin otherwise the next replica in turn, unless the set
# of connected replicas changed in between (gRPC then restarts the rotation at a random replica).
#
# GetChallenge and GetSecrets of one attestation may land on different replicas: a token is an HMAC
# under the key every replica shares, so any of them verifies it. Single use is remembered per replica
# only; a request replayed to another replica would be answered again, sealed to the enclave's own
# key, which gives the replayer nothing.


def parse_hosts(hosts: str | Sequence[str]) -> tuple[str, ...]:
    """Addresses from `--host` values: each HOST:PORT, or several separated by commas; duplicates
    dropped, order kept. A single value is passed to gRPC as it is (any gRPC target form works)."""
    items = [hosts] if isinstance(hosts, str) else [str(h) for h in hosts]
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                raise UsageError(f"--host {item!r}: empty address")
            if part not in out:
                out.append(part)
    if not out:
        raise UsageError("--host: no address given")
    if len(out) > 1:
        for part in out:
            _split_host_port(part)
    return tuple(out)


def _split_host_port(addr: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or [IPv6]:PORT."""
    if addr.startswith("["):
        host, sep, rest = addr[1:].partition("]")
        port = rest[1:] if sep and rest.startswith(":") else ""
    else:
        host, _sep, port = addr.rpartition(":")
        if ":" in host:
            host = ""  # a bare IPv6 address needs brackets
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--host {addr!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT) when giving several")
    return host, int(port)


def _ip_addresses(host: str, port: int) -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) addresses of `host`: itself if a literal, else what the system resolver says."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return ([str(ip)], []) if ip.version == 4 else ([], [str(ip)])
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise Unreachable(f"{host}: cannot resolve ({e})") from None
    v4 = list(dict.fromkeys(str(i[4][0]) for i in infos if i[0] == socket.AF_INET))
    v6 = list(dict.fromkeys(str(i[4][0]) for i in infos if i[0] == socket.AF_INET6))
    return v4, v6


def channel_target(hosts: Sequence[str]) -> tuple[str, str | None]:
    """(gRPC target, TLS name to verify). One address: itself, verified as gRPC does by default.
    Several: one static multi-address target of a single IP family (IPv4 when every host has one),
    verified against the first host's name (replicas behind one service name share a certificate
    name; give --server-name otherwise)."""
    if len(hosts) == 1:
        return hosts[0], None
    resolved = [(*_split_host_port(h), *_ip_addresses(*_split_host_port(h))) for h in hosts]
    if all(v4 for _h, _p, v4, _v6 in resolved):
        target = "ipv4:" + ",".join(f"{ip}:{port}" for _h, port, v4, _v6 in resolved for ip in v4)
    elif all(v6 for _h, _p, _v4, v6 in resolved):
        target = "ipv6:" + ",".join(f"[{ip}]:{port}" for _h, port, _v4, v6 in resolved for ip in v6)
    else:
        raise UsageError("--host: the addresses mix IPv4-only and IPv6-only hosts; give one family")
    return target, resolved[0][0]


def service_config(lb: str, *, shuffle: bool = False) -> str:
    """The channel's service config: the balancing policy, and gRPC's own retry for GetChallenge.
    `shuffle` (pick_first only): each client starts at a random replica instead of the first."""
    if lb not in LB_POLICIES:
        raise UsageError(f"load-balancing policy must be one of {', '.join(LB_POLICIES)}, not {lb!r}")
    return json.dumps(
        {
            "loadBalancingConfig": [{lb: {"shuffleAddressList": True} if shuffle else {}}],
            "methodConfig": [
                {
                    "name": [{"service": SERVICE_NAME, "method": "GetChallenge"}],
                    "retryPolicy": {
                        "maxAttempts": 3,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "0.5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def _channel(
    hosts: Sequence[str],
    ca_pem: bytes | None,
    server_name: str | None,
    lb: str = "round_robin",
    *,
    shuffle: bool = False,
) -> grpc.Channel:
    target, tls_name = channel_target(hosts)
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
        ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
        ("grpc.service_config", service_config(lb, shuffle=shuffle)),
    ]
    if len(hosts) > 1:
        options.append(("grpc.default_authority", hosts[0]))
    if server_name or tls_name:
        options.append(("grpc.ssl_target_name_override", server_name or tls_name))
    return grpc.secure_channel(target, creds, options=options)


def _replica_of(call: Any) -> str:
    """The `asps-replica` trailing metadata of a finished call (or RpcError), if the server sent it."""
    try:
        metadata = call.trailing_metadata() or ()
    except Exception:  # an error raised before any metadata arrived
        return ""
    for key, value in metadata:
        if key == REPLICA_METADATA:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


def _rpc_error(e: grpc.RpcError, host: str, what: str) -> ClientError:
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else "") or ""
    replica = _replica_of(e)
    if replica:
        host = f"{host} (replica {replica})"
    if code == grpc.StatusCode.UNAVAILABLE and (
        "connect" in details.lower() or "handshake" in details.lower() or "ssl" in details.lower()
    ):
        return Unreachable(f"{host}: unreachable during {what}: {details}", status=code, reason=details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unreachable(f"{host}: no answer in time during {what}", status=code, reason=details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return RetryLater(f"{host}: temporarily unavailable: {details}", status=code, reason=details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotGranted(f"{host}: not granted: {details}", status=code, reason=details)
    if code in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    ):
        name = code.name if code else "?"
        return Refused(f"{host}: refused ({name}): {details}", status=code, reason=details)
    name = code.name if code else "?"
    return ClientError(f"{host}: {what} failed ({name}): {details}", status=code, reason=details)


def _attest(
    challenges: asps_pb2_grpc.SecretProvisionStub,
    requests: asps_pb2_grpc.SecretProvisionStub,
    label: str,
    evidence: Evidence,
    names: list[str],
    timeout: float,
    connect_timeout: float,
) -> tuple[asps_pb2.SecretsReply, bytes, str]:
    """One attestation: (reply, the token it used, the replica that answered)."""
    try:
        challenge = challenges.GetChallenge(
            asps_pb2.ChallengeRequest(), timeout=min(timeout, connect_timeout)
        )
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            # GetChallenge does no work on the server: failing it means we never got through.
            raise Unreachable(
                f"{label}: cannot reach the server ({e.details()}); is it running, is the address right, "
                "and is its certificate signed by the pinned --ca?",
                status=e.code(),
                reason=e.details() or "",
            ) from None
        raise _rpc_error(e, label, "GetChallenge") from None
    token = challenge.token
    signature = asps_wire.sign_transcript(evidence.private_key,
                                          asps_wire.transcript(token, evidence.cert_der, names))
    request = asps_pb2.SecretsRequest(
        evidence=evidence.cert_der, token=token, names=names, signature=signature
    )
    try:
        reply, call = requests.GetSecrets.with_call(request, timeout=timeout)
    except grpc.RpcError as e:
        raise _rpc_error(e, label, "GetSecrets") from None
    return reply, token, _replica_of(call)


def _address_label(family: int, addr: tuple[Any, ...]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"


def _probe(family: int, addr: tuple[Any, ...], ctx: ssl.SSLContext, tls_name: str, timeout: float) -> str:
    """What one address does with a TCP connect and a TLS handshake verified as gRPC verifies it."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(addr)
            with ctx.wrap_socket(sock, server_hostname=tls_name):
                return "TLS handshake succeeds now (the server may have been starting or overloaded)"
    except ssl.SSLCertVerificationError as e:
        return (
            f"TLS certificate verification failed: {e.verify_message or e.reason} "
            "(the server's certificate expired, is not for this name, or is not signed by --ca)"
        )
    except ssl.SSLError as e:
        return f"TLS handshake failed: {e.reason or e}"
    except ConnectionRefusedError:
        return "connection refused (nothing listens there)"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return e.strerror or str(e)


def diagnose_connection(
    hosts: Sequence[str], ca_pem: bytes | None, server_name: str | None, timeout: float = 5.0
) -> list[str]:
    """Why no TLS connection could be made, one phrase per address tried (each resolved address of
    each HOST:PORT), so that "certificate verification failed" is told apart from "connection refused":
    gRPC's own error names only the last address it tried. Empty for targets that are not HOST:PORT."""
    try:
        endpoints = [_split_host_port(h) for h in hosts]
    except UsageError:
        return []
    _target, tls_name = channel_target(hosts) if len(hosts) > 1 else (None, None)
    try:
        ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace") if ca_pem else None)
    except (ssl.SSLError, ValueError) as e:
        return [f"--ca holds no usable PEM CA certificate ({getattr(e, 'reason', None) or e})"]
    ctx.set_alpn_protocols(["h2"])
    found: list[str] = []
    for host, port in endpoints:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            found.append(f"{host}:{port}: cannot resolve {host} ({e.strerror or e})")
            continue
        for family, _kind, _proto, _name, addr in dict.fromkeys((i[0], 0, 0, "", i[4]) for i in infos):
            name = server_name or tls_name or host
            found.append(f"{_address_label(family, addr)}: {_probe(family, addr, ctx, name, timeout)}")
    return found


def _diagnosed(
    e: ClientError, hosts: Sequence[str], ca_pem: bytes | None, server_name: str | None, timeout: float
) -> ClientError:
    """An Unreachable whose message says, per address, what actually failed."""
    found = diagnose_connection(hosts, ca_pem, server_name, timeout)
    if not found:
        return e
    label = ",".join(hosts)
    return Unreachable(f"{label}: cannot connect: " + "; ".join(found), status=e.status, reason=e.reason)


def fetch_secrets(
    host: str | Sequence[str],
    *,
    ca: bytes | str | None,
    names: Sequence[str] = (),
    evidence: Evidence | None = None,
    provider: str | None = None,
    provider_options: dict[str, Any] | None = None,
    key_type: str = "p256",
    timeout: float = 10.0,
    connect_timeout: float = 5.0,
    server_name: str | None = None,
    lb: str = "round_robin",
    retries: int = 1,
) -> Result:
    """One attestation: challenge, signed request, sealed reply opened. Raises ClientError subclasses.

    `host` is one address or several replicas (a list, or comma-separated), balanced by gRPC with
    `lb` ("round_robin" or "pick_first"). On UNAVAILABLE the attestation is repeated up to `retries`
    times with a fresh challenge (the balancer picks the next replica); other refusals are final.
    `ca` pins the server's CA (PEM bytes, or a file name); None uses the system roots.
    `names` empty asks for every secret the policy grants this enclave.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise UsageError("a secret name is repeated")
    if retries < 0:
        raise UsageError("retries must not be negative")
    hosts = parse_hosts(host)
    label = ",".join(hosts)
    ca_pem = _read_ca(ca)
    if evidence is None:
        evidence = make_evidence(provider, key_type=key_type, **(provider_options or {}))
    # One channel balances every GetSecrets. Its first challenge comes from it too (that first call
    # makes gRPC connect to every replica); a retry's challenge comes from a second channel (one
    # connection, opened only then) so that round_robin's next pick on the first channel, the retry's
    # GetSecrets, is the replica after the one that failed. Taken from the first channel, with two
    # replicas and two calls per attestation, every GetSecrets would land on the same replica.
    channels = [
        _channel(hosts, ca_pem, server_name, lb),
        _channel(hosts, ca_pem, server_name, "pick_first", shuffle=lb == "round_robin"),
    ]
    try:
        main, side = (asps_pb2_grpc.SecretProvisionStub(c) for c in channels)
        attempt = 0
        while True:
            attempt += 1
            try:
                reply, token, replica = _attest(
                    main if attempt == 1 else side, main, label, evidence, names, timeout, connect_timeout
                )
                break
            except ClientError as e:
                if (
                    isinstance(e, Unreachable)
                    and e.status == grpc.StatusCode.UNAVAILABLE
                    and attempt > retries
                ):
                    raise _diagnosed(e, hosts, ca_pem, server_name, connect_timeout) from None
                if e.status != grpc.StatusCode.UNAVAILABLE or attempt > retries:
                    raise
    finally:
        for c in channels:
            c.close()
    secrets = open_bundle(evidence.private_key, reply.sealed, token)
    if names and set(secrets) != set(names):
        raise BadReply("the reply does not hold exactly the secrets asked for")
    if not secrets:
        raise BadReply("the reply holds no secrets")
    return Result(reply.app_id, secrets, label, replica, attempt)


def get_secrets(
    host: str | Sequence[str], *, ca: bytes | str | None, names: Sequence[str] = (), **kwargs: Any
) -> dict[str, bytes]:
    """The secrets this enclave is granted (all, or `names`), as name -> bytes."""
    return fetch_secrets(host, ca=ca, names=names, **kwargs).secrets


def get_secret_legacy(
    host: str | Sequence[str],
    key: str,
    *,
    ca: bytes | str | None,
    evidence: Evidence,
    timeout: float = 10.0,
    server_name: str | None = None,
    lb: str = "round_robin",
) -> str:
    """The original cczoo call (secretmanager.SecretManger/GetSecret) for servers run with --legacy-cczoo."""
    import secretmanager_pb2
    import secretmanager_pb2_grpc

    hosts = parse_hosts(host)
    channel = _channel(hosts, _read_ca(ca), server_name, lb)
    try:
        stub = secretmanager_pb2_grpc.SecretMangerStub(channel)
        ctx = ratls_attest.cert_to_pem(evidence.cert_der).decode("ascii")
        try:
            reply = stub.GetSecret(secretmanager_pb2.SecretRequest(key=key, ctx=ctx), timeout=timeout)
        except grpc.RpcError as e:
            raise _rpc_error(e, ",".join(hosts), "GetSecret") from None
    finally:
        channel.close()
    return reply.value


def _read_ca(ca: bytes | str | None) -> bytes | None:
    if ca is None or isinstance(ca, bytes):
        return ca
    try:
        with open(ca, "rb") as f:  # open, not pathlib: pathlib is not worth loading for one read
            return f.read()
    except OSError as e:
        raise UsageError(f"--ca {ca}: {e.strerror}") from None


# --- command line -------------------------------------------------------------------------------------


def _hex32(value: str) -> bytes:
    import argparse

    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be 64 hex characters") from None
    if len(raw) != 32:
        raise argparse.ArgumentTypeError("must be 64 hex characters")
    return raw


def _hex48(value: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 48:
        raise argparse.ArgumentTypeError("must be 96 hex characters")
    return raw


def _sim_rtmrs(specs: list[str]) -> tuple[bytes, ...]:
    rtmrs = [bytes(48)] * 4
    for spec in specs:
        index, _, value = spec.partition("=")
        if index not in ("0", "1", "2", "3"):
            raise UsageError(f"--sim-rtmr {spec[:16]}: give N=HEX with N 0..3")
        try:
            rtmrs[int(index)] = _hex48(value)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--sim-rtmr {index}: {e}") from None
    return tuple(rtmrs)


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from cli_env import add_env_argument

    p = argparse.ArgumentParser(
        prog="asps_client.py",
        description="Attest this enclave to an ASPS server and receive its secrets. By default prints "
        "'Secret received: <value>' for each secret (like the original cczoo client).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        "-host",
        action="append",
        metavar="HOST:PORT",
        help="server address [ASPS_HOST] (default localhost:50051); repeat it or separate by commas to "
        "give several replicas, balanced by gRPC (see --lb)",
    )
    add_env_argument(
        p,
        "--lb",
        choices=LB_POLICIES,
        env_name="ASPS_LB",
        default="round_robin",
        help="gRPC load-balancing policy over the replicas [ASPS_LB]: round_robin spreads attestations, "
        "pick_first uses the first that answers and fails over in order (default %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="repeat the attestation this many times, with a fresh challenge, when a replica answers "
        "UNAVAILABLE (default %(default)s)",
    )
    add_env_argument(
        p,
        "--ca",
        "-ca",
        "--root_cert",
        env_name="ASPS_CA",
        default="ca.crt",
        help="CA certificate (PEM) the server's TLS certificate must chain to [ASPS_CA]",
    )
    add_env_argument(
        p,
        "--server-name",
        env_name="ASPS_SERVER_NAME",
        help="expected TLS name of the server, if not the host's [ASPS_SERVER_NAME]",
    )
    p.add_argument(
        "--secret",
        "--key",
        "-key",
        dest="names",
        action="append",
        metavar="NAME",
        help="name of a secret to request (repeatable); --key is the original's name for it (e.g. "
        "--key master_key). Omit it, or give 'all', for every secret the policy grants this enclave",
    )
    p.add_argument(
        "--json", action="store_true", help="print {app_id, secrets} as JSON (values as UTF-8 or base64)"
    )
    p.add_argument(
        "--out-dir", help="write each secret to OUT_DIR/<name> with mode 0600 instead of printing it"
    )
    add_env_argument(
        p,
        "--provider",
        choices=("sim", "occlum", "gramine", "tdx"),
        env_name="ASPS_PROVIDER",
        help="quote provider [ASPS_PROVIDER] (default: detect Occlum, then Gramine, then a TD's "
        "configfs-tsm)",
    )
    p.add_argument(
        "--key-type", choices=("p256", "p384"), default="p256", help="evidence key type (default %(default)s)"
    )
    p.add_argument("--evidence-format", choices=("cczoo", "gramine", "dice"),
                   help="RA-TLS certificate shape (default: gramine under Gramine, dice in a TD, else cczoo)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default %(default)s)")
    p.add_argument(
        "--connect-timeout", type=float, default=5.0, help="seconds to establish TLS (default %(default)s)"
    )
    p.add_argument(
        "--legacy-cczoo",
        action="store_true",
        help="use the original secretmanager protocol (one --key; server must run --legacy-cczoo)",
    )
    sim = p.add_argument_group("simulated platform (demos and tests only; --provider sim)")
    add_env_argument(
        sim,
        "--sim-dir",
        env_name="ASPS_SIM_DIR",
        default="sim",
        help="sim platform directory [ASPS_SIM_DIR]; it must exist (made by `python dcap.py sim-init DIR` "
        "or ./run.sh) unless --sim-init is given (default %(default)s)",
    )
    sim.add_argument(
        "--sim-init",
        action="store_true",
        help="create a new simulated platform in --sim-dir if there is none (its quotes verify only "
        "against its own root CA and collateral)",
    )
    sim.add_argument("--sim-mr-enclave", type=_hex32, help="mr_enclave the simulated enclave reports (hex)")
    sim.add_argument("--sim-mr-signer", type=_hex32, help="mr_signer the simulated enclave reports (hex)")
    sim.add_argument("--sim-isv-prod-id", type=int, default=0)
    sim.add_argument("--sim-isv-svn", type=int, default=0)
    sim.add_argument("--sim-debug", action="store_true", help="report a debug enclave")
    sim.add_argument("--sim-tcb", default="UpToDate", help="TCB level of the simulated platform")
    sim.add_argument("--sim-tee", choices=("sgx", "tdx"), default="sgx", help="simulate an enclave or a TD")
    sim.add_argument("--sim-mr-td", type=_hex48, help="mr_td the simulated TD reports (hex, --sim-tee tdx)")
    sim.add_argument("--sim-rtmr", action="append", default=[], metavar="N=HEX",
                     help="RTMR N (0-3) the simulated TD reports (repeatable; default zeros)")
    sim.add_argument("--sim-td-relaunch", action="store_true",
                     help="a TD whose TCB a relaunch would bring up to date (TDRelaunchAdvised)")
    return p


SIM_PLATFORM_FILE = "platform.json"  # what sgxsim.SimPlatform keeps in its directory


def _provider_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.provider != "sim":
        return {}
    from pathlib import Path  # the simulated platform's directory: the "sim" provider only

    sim_dir = Path(args.sim_dir)
    if not args.sim_init and not (sim_dir / SIM_PLATFORM_FILE).is_file():
        # A typo would otherwise make a new platform, whose quotes match no server's root and collateral.
        what = (
            "does not exist" if not sim_dir.exists() else f"holds no simulated platform ({SIM_PLATFORM_FILE})"
        )
        raise UsageError(
            f"--sim-dir {args.sim_dir}: {what}; check the path (the server's --collateral and --root-ca "
            "come from the same directory), or add --sim-init to create a new platform there"
        )
    opts: dict[str, Any] = {
        "sim_dir": args.sim_dir,
        "isv_prod_id": args.sim_isv_prod_id,
        "isv_svn": args.sim_isv_svn,
        "debug": args.sim_debug,
        "tcb": args.sim_tcb,
    }
    if args.sim_tee == "tdx":
        opts.update(tee="tdx", relaunch=args.sim_td_relaunch, rtmrs=_sim_rtmrs(args.sim_rtmr))
        if args.sim_mr_td:
            opts["mr_td"] = args.sim_mr_td
    if args.sim_mr_enclave:
        opts["mr_enclave"] = args.sim_mr_enclave
    if args.sim_mr_signer:
        opts["mr_signer"] = args.sim_mr_signer
    return opts


def _printable(value: bytes) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        import base64  # only a value that is not UTF-8 needs it

        return "base64:" + base64.b64encode(value).decode()
    return text


def _open_private_dir(out_dir: str | os.PathLike[str]) -> int:
    """An fd on OUT_DIR (created mode 0700 when absent) once it is known that only this user can add,
    replace or remove entries in it; another user who could would swap a secret's file for one they
    read. Checked on the opened fd, so the directory cannot be changed between check and use."""
    path = os.fspath(out_dir)
    euid = os.geteuid()
    try:
        try:
            link = os.lstat(path)
        except FileNotFoundError:
            link = None
        if link is not None and stat.S_ISLNK(link.st_mode) and link.st_uid != euid:
            raise OutDirError(
                f"--out-dir {path}: is a symbolic link owned by uid {link.st_uid}, not by this user "
                f"(uid {euid}); give the directory itself"
            )
        created = False
        if link is None:
            os.makedirs(path, mode=0o700)  # a concurrent creator makes this fail: nothing is reused
            created = True
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileExistsError:
        raise OutDirError(f"--out-dir {path}: appeared while it was being created; run again") from None
    except OSError as e:
        raise OutDirError(f"--out-dir {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != euid:
            raise OutDirError(
                f"--out-dir {path}: owned by uid {st.st_uid}, not by this user (uid {euid}); "
                "use a directory only this user can write to"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OutDirError(
                f"--out-dir {path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                "use a private directory (chmod 700) or a path that does not exist yet"
            )
        if created:
            os.fchmod(fd, 0o700)  # exactly 0700 whatever the umask
    except OSError as e:
        os.close(fd)
        raise OutDirError(f"--out-dir {path}: {e.strerror or e}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_secret_files(out_dir: str | os.PathLike[str], secrets: Mapping[str, bytes]) -> None:
    """Write each secret to OUT_DIR/<name>, mode 0600, owned by this user (what --out-dir does).

    Each value goes into a new temp file (O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file or a
    symlink's target), is fsync'ed, then renamed over <name>: a file or symlink someone planted at
    <name> is replaced, never written through. OutDirError (exit code 2) for an unsafe directory
    or a write that fails; BadReply for a name that is not a plain file name.
    """
    for name in secrets:
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise BadReply(f"secret name {name!r} is not a safe file name")
    path = os.fspath(out_dir)
    dfd = _open_private_dir(path)
    try:
        for name, value in secrets.items():
            tmp = f".asps-{os.urandom(8).hex()}.tmp"
            try:
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dfd,
                )
                try:
                    with os.fdopen(fd, "wb") as f:
                        os.fchmod(f.fileno(), 0o600)  # exactly 0600 whatever the umask
                        f.write(value)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
            except OSError as e:
                raise OutDirError(f"--out-dir {path}: cannot write {name!r}: {e.strerror or e}") from None
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            os.fsync(dfd)
    finally:
        os.close(dfd)


def main(argv: Sequence[str] | None = None) -> int:
    from cli_env import env

    args = build_parser().parse_args(argv)
    names = [n for n in (args.names or []) if n != "all"]
    try:
        ca_pem = _read_ca(args.ca)
        hosts = parse_hosts(args.host or [env("ASPS_HOST", "localhost:50051")])
    except ClientError as e:
        print(f"asps_client: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.out_dir:  # refuse an unsafe --out-dir before any secret is asked for
            os.close(_open_private_dir(args.out_dir))
        options = _provider_options(args)
        evidence = make_evidence(args.provider, key_type=args.key_type, fmt=args.evidence_format, **options)
        if args.legacy_cczoo:
            if len(names) != 1:
                print("asps_client: --legacy-cczoo takes exactly one --key", file=sys.stderr)
                return EXIT_USAGE
            value = get_secret_legacy(
                hosts,
                names[0],
                ca=ca_pem,
                evidence=evidence,
                timeout=args.timeout,
                server_name=args.server_name,
                lb=args.lb,
            )
            result = Result("", {names[0]: value.encode("utf-8")}, ",".join(hosts))
        else:
            result = fetch_secrets(
                hosts,
                ca=ca_pem,
                names=names,
                evidence=evidence,
                timeout=args.timeout,
                connect_timeout=args.connect_timeout,
                server_name=args.server_name,
                lb=args.lb,
                retries=args.retries,
            )
        if args.out_dir:
            write_secret_files(args.out_dir, result.secrets)
            print(f"{len(result.secrets)} secret(s) written to {args.out_dir} for app {result.app_id}")
        elif args.json:
            print(
                json.dumps(
                    {
                        "app_id": result.app_id,
                        "host": result.host,
                        "replica": result.replica,
                        "secrets": {k: _printable(v) for k, v in result.secrets.items()},
                    }
                )
            )
        else:
            many = len(result.secrets) > 1
            for name, value in result.secrets.items():
                label = f" ({name})" if many else ""
                print(f"Secret received{label}: {_printable(value)}")
        return EXIT_OK
    except ClientError as e:
        print(f"asps_client: {e}", file=sys.stderr)
        if isinstance(e, NotGranted) and names:
            print(NOT_GRANTED_HINT, file=sys.stderr)
        return e.exit_code


NOT_GRANTED_HINT = (
    "asps_client: hint: --key/--secret NAME asks for that one secret; omit --key (or give --key all) "
    "to receive every secret the policy grants this enclave"
)


if __name__ == "__main__":
    sys.exit(main())
