"""`./run.sh demo`, `./run.sh demo vault` and `./run.sh demo tdx` in a fresh copy of the tree print the
secret.

The copy holds the tracked and untracked-but-not-ignored files (what a clone of the next commit
holds); its .venv is a link to this one so that nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from openbao import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    dest = tmp_path_factory.mktemp("clone") / "asps"
    for raw in filter(None, files):
        rel = raw.decode()
        src = REPO / rel
        if not src.is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    for generated in ("sim", "certs", "demo"):
        assert not (dest / generated).exists(), f"{generated}/ must not be part of the tree"
    os.symlink(REPO / ".venv", dest / ".venv")
    return dest


def run_demo(copy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASPS_", "VAULT_", "BAO_"))}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    return subprocess.run(
        ["./run.sh", "demo", *args], cwd=copy, env=env, capture_output=True, text=True, timeout=150
    )


def assert_stopped(stderr: str) -> None:
    """Every process the demo started (it logs their pids) is gone."""
    pids = [int(p) for p in re.findall(r"\(pid (\d+)", stderr)]
    assert pids, stderr
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"demo left pid {pid} running")


def test_demo_prints_the_secret(fresh_copy):
    done = run_demo(fresh_copy)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Secret received: 42-cd-4b-24-f6-0f-a5-33-85-ca-03-74-0d-4b-91-d7"
    assert (fresh_copy / "sim" / "root_ca.pem").is_file() and (fresh_copy / "certs" / "ca.crt").is_file()
    assert_stopped(done.stderr)
    # the server's audit line says who got what, without the value
    log = (fresh_copy / "demo" / "server.log").read_text()
    assert '"verdict": "granted"' in log and "42-cd-4b-24" not in log


def test_demo_vault_prints_a_secret_from_openbao(fresh_copy):
    done = run_demo(fresh_copy, "vault")
    assert done.returncode == 0, done.stderr
    m = re.fullmatch(r"Secret received: ((?:[0-9a-f]{2}-){15}[0-9a-f]{2})", done.stdout.strip())
    assert m, done.stdout
    assert_stopped(done.stderr)
    secret = m.group(1)
    for log in (fresh_copy / "demo").glob("*.log"):
        assert secret not in log.read_text(), log
    assert (fresh_copy / "demo" / "policy_vault.json").stat().st_mode & 0o077 == 0


def test_demo_tdx_prints_the_secret_to_a_simulated_td(fresh_copy):
    done = run_demo(fresh_copy, "tdx")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Secret received: 42-cd-4b-24-f6-0f-a5-33-85-ca-03-74-0d-4b-91-d7"
    assert "the simulated TD was attested" in done.stderr
    assert_stopped(done.stderr)
    log = (fresh_copy / "demo" / "server.log").read_text()
    granted = [ln for ln in log.splitlines() if '"verdict": "granted"' in ln]
    assert granted and '"tee": "tdx"' in granted[-1] and '"app_id": "td"' in granted[-1]
    assert "42-cd-4b-24" not in log


def test_run_sh_server_then_client_as_the_original(fresh_copy):
    """`./run.sh server &` then `./run.sh client`, natively (no Occlum instance here)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASPS_", "VAULT_", "BAO_"))}
    env["ASPS_POLICY"] = "policy_no_kms.json"
    server = subprocess.Popen(
        ["./run.sh", "server", "--host", f"127.0.0.1:{port}"],
        cwd=fresh_copy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # blocks until the server is up (or exits)
        assert line.startswith(f"Server listening on 127.0.0.1:{port}"), line
        done = subprocess.run(
            ["./run.sh", "client", "--host", f"localhost:{port}"],
            cwd=fresh_copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "Secret received: 42-cd-4b-24-f6-0f-a5-33-85-ca-03-74-0d-4b-91-d7\n"
        refused = subprocess.run(
            ["./run.sh", "client", "--host", f"localhost:{port}", "--key", "nope"],
            cwd=fresh_copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 5, refused.stderr
        assert "'nope' is not granted" in refused.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)


def test_run_sh_is_shellcheck_clean():
    assert shutil.which("shellcheck"), "shellcheck is needed (./run.sh test installs it as root)"
    done = subprocess.run(["shellcheck", "run.sh"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
