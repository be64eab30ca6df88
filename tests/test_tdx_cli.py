"""`python dcap.py verify` on TD quotes: the JSON reports the TD identity (hex), TCB status,
advisories, the TDX module identity matched and padding; the exit code says genuine or not; a debug TD
is reported `debug: true`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "samples"
RD = bytes(range(64))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "dcap.py"), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


@pytest.fixture(scope="module")
def td_files(sim_platform, tmp_path_factory):
    d = tmp_path_factory.mktemp("td-cli")
    coll = d / "tdx-collateral.json"
    coll.write_text(sim_platform.tdx_collateral().to_json())
    root = d / "root.pem"
    root.write_bytes(sim_platform.root_ca_pem)
    files = {}
    for name, kw in (("plain", dict(version=5, td15=True, padding=70)), ("debug", dict(debug=True)),
                     ("outofdate", dict(td_tcb="OutOfDate")), ("below", dict(td_tcb="BelowAllLevels"))):
        (d / name).write_bytes(sim_platform.make_td_quote(RD, **kw))
        files[name] = str(d / name)
    return files, str(coll), str(root)


def test_cli_verify_td_json(td_files):
    files, coll, root = td_files
    p = run_cli("verify", files["plain"], "--collateral", coll, "--root-ca", root, "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["tee_type"] == "TDX" and d["status"] == "UpToDate" and d["advisory_ids"] == []
    assert d["td"]["report_data"] == RD.hex() and len(d["td"]["mr_td"]) == 96
    assert set(d["td"]) >= {"tee_tcb_svn", "mr_seam", "mr_signer_seam", "seam_attributes", "td_attributes",
                            "xfam", "mr_td", "mr_config_id", "mr_owner", "mr_owner_config", "rtmr0", "rtmr1",
                            "rtmr2", "rtmr3", "report_data", "tee_tcb_svn_2", "mr_service_td"}
    assert d["tdx_module_identity"] == "TDX_01" and d["tdx_module_status"] == "UpToDate"
    assert d["padding"] == 70 and d["quote_version"] == 5 and d["debug"] is False


def test_cli_verify_td_outcomes(td_files):
    files, coll, root = td_files
    p = run_cli("verify", files["debug"], "--collateral", coll, "--root-ca", root, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["debug"] is True
    p = run_cli("verify", files["debug"], "--collateral", coll, "--root-ca", root)
    assert p.returncode == 0 and "debug: True" in p.stdout.splitlines() and "tee_type: TDX" in p.stdout
    p = run_cli("verify", files["outofdate"], "--collateral", coll, "--root-ca", root, "--json")
    d = json.loads(p.stdout)
    assert p.returncode == 0 and d["status"] == "OutOfDate" and d["advisory_ids"]
    p = run_cli("verify", files["below"], "--collateral", coll, "--root-ca", root, "--json")
    assert p.returncode == 1 and p.stdout == ""
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tdx_tcb_level" in errors[0]   # (the other line: a non-Intel root warning)


def test_cli_verify_real_td_with_padding():
    case = SAMPLES / "realworld2" / "dcapqvl-tdx-b0c06f-uptodate"
    now = json.loads((case / "case.json").read_text())["now"]
    p = run_cli("verify", str(case / "quote.bin"), "--collateral", str(case / "collateral.json"),
                "--now", str(now), "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert (d["status"], d["padding"], d["fmspc"]) == ("UpToDate", 70, "b0c06f000000")
