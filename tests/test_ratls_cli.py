"""`python ratls.py make|verify` end to end (subprocesses, simulated platform)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

import ratls_attest

MR_ENCLAVE = "c0ffee" + "42" * 29
MR_SIGNER = "51" * 32


def run(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(repo / "ratls.py"), *args], capture_output=True, text=True, timeout=60, cwd=repo
    )


@pytest.fixture(scope="module")
def sim(sim_platform) -> Path:
    return Path(sim_platform.directory)


@pytest.fixture(scope="module")
def made(repo_dir, sim, tmp_path_factory):
    """One gramine (P-384) and one debug/OutOfDate cczoo certificate made through the CLI."""
    out = tmp_path_factory.mktemp("cli")
    common = ["--provider", "sim", "--sim-dir", str(sim)]
    common += ["--mr-enclave", MR_ENCLAVE, "--mr-signer", MR_SIGNER]
    r = run(repo_dir, "make", *common, "--format", "gramine", "--isv-prod-id", "4", "--isv-svn", "2",
            "--cert", str(out / "g.pem"), "--key", str(out / "g.key"))
    assert r.returncode == 0, r.stderr
    r = run(repo_dir, "make", *common, "--debug", "--tcb", "OutOfDate", "--key-type", "rsa3072",
            "--validity", "600", "--cert", str(out / "d.pem"), "--key", str(out / "d.key"))
    assert r.returncode == 0, r.stderr
    return out


def verify(repo: Path, sim: Path, cert: Path, *extra: str) -> tuple[int, dict, str]:
    r = run(repo, "verify", str(cert), "--collateral", str(sim / "collateral.json"),
            "--root-ca", str(sim / "root_ca.pem"), "--json", *extra)
    return r.returncode, json.loads(r.stdout), r.stderr


def test_make_writes_pem_and_private_key_0600(made):
    assert stat.S_IMODE((made / "g.key").stat().st_mode) == 0o600
    key = ratls_attest.load_key_pem((made / "g.key").read_bytes())
    cert = x509.load_pem_x509_certificate((made / "g.pem").read_bytes())
    assert key.curve.name == "secp384r1"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    d = x509.load_pem_x509_certificate((made / "d.pem").read_bytes())
    assert (d.not_valid_after_utc - d.not_valid_before_utc).total_seconds() == 660


def test_verify_accepts_matching_policy(repo_dir, sim, made):
    rc, out, err = verify(repo_dir, sim, made / "g.pem", "--mr-enclave", MR_ENCLAVE, "--isv-prod-id", "4",
                          "--min-isv-svn", "2")
    assert rc == 0, out
    assert out["accepted"] is True and out["reason"] is None
    ident = out["identity"]
    assert ident["mr_enclave"] == MR_ENCLAVE and ident["mr_signer"] == MR_SIGNER
    assert (ident["isv_prod_id"], ident["isv_svn"], ident["debug"]) == (4, 2, False)
    assert ident["tcb_status"] == "UpToDate" and ident["advisory_ids"] == []
    assert "not the Intel SGX Root CA" in err  # the simulated root is never silently trusted


def test_verify_without_policy_accepts_nothing(repo_dir, sim, made):
    rc, out, _ = verify(repo_dir, sim, made / "g.pem")
    assert rc == 1 and out["accepted"] is False
    assert "no policy given" in out["reason"]
    assert out["identity"]["mr_enclave"] == MR_ENCLAVE


def test_verify_refusals(repo_dir, sim, made):
    rc, out, _ = verify(repo_dir, sim, made / "g.pem", "--mr-signer", "00" * 32)
    assert rc == 1 and out["reason"] == f"mr_signer {MR_SIGNER} not in policy"
    rc, out, _ = verify(repo_dir, sim, made / "d.pem", "--mr-enclave", MR_ENCLAVE)
    assert rc == 1 and out["reason"] == "debug enclave refused"
    assert out["identity"]["tcb_status"] == "OutOfDate"
    rc, out, _ = verify(repo_dir, sim, made / "d.pem", "--mr-enclave", MR_ENCLAVE, "--allow-debug")
    assert rc == 1 and out["reason"] == "TCB status OutOfDate not allowed"
    rc, out, _ = verify(repo_dir, sim, made / "d.pem", "--mr-enclave", MR_ENCLAVE, "--allow-debug",
                        "--allow-tcb", "OutOfDate")
    assert rc == 0 and out["accepted"] is True
    later = str(int(time.time()) + 7200)
    rc, out, _ = verify(repo_dir, sim, made / "d.pem", "--mr-enclave", MR_ENCLAVE, "--allow-debug",
                        "--allow-tcb", "OutOfDate", "--now", later)
    assert rc == 1 and out["reason"].startswith("certificate expired")


def test_verify_not_genuine(repo_dir, sim, made, samples_dir):
    # against the real Intel root, a simulated quote is not genuine: identity is null
    r = run(repo_dir, "verify", str(made / "g.pem"), "--collateral", str(sim / "collateral.json"),
            "--mr-enclave", MR_ENCLAVE, "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["identity"] is None and out["accepted"] is False
    assert "quote_verification" in out["reason"]


def test_bad_policy_arguments(repo_dir, sim, made):
    r = run(repo_dir, "verify", str(made / "g.pem"), "--collateral", str(sim / "collateral.json"),
            "--mr-enclave", MR_ENCLAVE, "--allow-tcb", "Revoked")
    assert r.returncode == 2 and "Revoked can never be allowed" in r.stderr
    r = run(repo_dir, "verify", str(made / "g.pem"), "--collateral", str(sim / "collateral.json"),
            "--mr-enclave", MR_ENCLAVE[:63])
    assert r.returncode == 2 and "mr_enclave: odd-length" in r.stderr


def test_usage_errors(repo_dir, made, tmp_path):
    out = ["--cert", str(tmp_path / "c"), "--key", str(tmp_path / "k")]
    r = run(repo_dir, "make", "--provider", "occlum", "--debug", *out)
    assert r.returncode == 2 and "--debug: only with --provider sim" in r.stderr
    r = run(repo_dir, "make", "--provider", "sim", *out)
    assert r.returncode == 2 and "--sim-dir is required" in r.stderr
    r = run(repo_dir, "verify", str(made / "g.pem"), "--mr-enclave", MR_ENCLAVE)
    assert r.returncode == 2 and "exactly one of --collateral" in r.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "k").exists()
