"""A TD's collateral from a PCCS: TDX TCB info and TD QE identity from /tdx/certification/v4, the CRLs
from /sgx/certification/v4, cached per (FMSPC, type) beside the SGX collateral of the same platform."""

from __future__ import annotations

import pytest
from asps_testkit import HttpStandIn, serve_pccs

import dcap
import pccs
from dcap_collateral import Collateral

RD = bytes(64)


def serve(sgx: Collateral, tdx: Collateral, fmspc: str, requests: list[str]) -> HttpStandIn:
    """The testkit's PCCS stand-in, recording what is asked for, serving the processor CA's PCK CRL."""
    return serve_pccs(sgx, tdx, fmspc, requests=requests, pck_ca="processor")


@pytest.fixture()
def stand_in(sim_platform):
    requests: list[str] = []
    plat = sim_platform
    server = serve(plat.collateral(), plat.tdx_collateral(), plat.fmspc.hex(), requests)
    yield server, requests
    server.close()


def test_td_and_enclave_on_one_pccs_each_get_their_collateral(sim_platform, stand_in):
    server, requests = stand_in
    source = pccs.PccsCollateralSource(server.url)
    v = dcap.Verifier(source, root_ca=sim_platform.root_ca_der)
    td = v.verify(sim_platform.make_td_quote(RD, version=5, td15=True))
    assert td.tee_type == "TDX" and td.status == "UpToDate"
    assert v.verify(sim_platform.make_quote(RD)).tee_type == "SGX"
    tdx_paths = sorted(p.split("?")[0] for p in requests if p.startswith("/tdx/"))
    assert tdx_paths == ["/tdx/certification/v4/qe/identity", "/tdx/certification/v4/tcb"]
    assert sum(p.startswith("/sgx/certification/v4/tcb") for p in requests) == 1
    assert sum(p.startswith("/sgx/certification/v4/pckcrl") for p in requests) == 2   # one per kind
    # warm: no request for either kind
    n = len(requests)
    for _ in range(3):
        assert v.verify(sim_platform.make_td_quote(RD, td_tcb="OutOfDate")).status == "OutOfDate"
        assert v.verify(sim_platform.make_quote(RD)).status == "UpToDate"
    assert len(requests) == n == source.requests
    # the cache keys say which kind they hold
    assert (sim_platform.fmspc, dcap.TDX_CA_PREFIX + "processor") in source._cache
    name = dcap.collateral_key_name((sim_platform.fmspc, dcap.TDX_CA_PREFIX + "processor"))
    assert name.startswith("TDX collateral for FMSPC")


def test_tdx_fetch_for_an_unknown_fmspc_is_a_collateral_error(stand_in):
    server, _ = stand_in
    source = pccs.PccsCollateralSource(server.url + "/sgx/certification/v4")
    assert source.tdx_base == server.url + "/tdx/certification/v4"
    with pytest.raises(dcap.CollateralError, match="HTTP 404"):
        source.fetch(bytes(6), dcap.TDX_CA_PREFIX + "processor")
    with pytest.raises(dcap.CollateralError, match="'processor' or 'platform'"):
        source.fetch(bytes(6), dcap.TDX_CA_PREFIX + "bogus")
