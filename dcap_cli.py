"""The `python dcap.py` command line: sim-init (simulated platform), quote (a provider), verify.

Who may import it: nobody but dcap.py's `__main__` block.  It is the one place that wires the
attester, the simulator and PCCS to the verifier for a shell, which the verifier itself must not
import.  Same commands, flags and exit codes as ever: 0 on success (verify: only when genuine),
1 with `error: <Type>: <reason>` on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import attester
import dcap
import pccs
from dcap_quote import DcapError


def _hex_arg(value: str, size: int | None, name: str) -> bytes:
    try:
        b = bytes.fromhex(value)
    except ValueError:
        raise DcapError(f"{name}: not hex") from None
    if size is not None and len(b) != size:
        raise DcapError(f"{name}: must be {size} bytes ({2 * size} hex digits)")
    return b


def _read_quote_file(path: str) -> bytes:
    """A quote file holds raw bytes, or hex text (as many tools print quotes)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DcapError(f"quote {path}: cannot read ({exc.strerror})") from None
    text = data.strip()
    if text and len(text) % 2 == 0 and re.fullmatch(rb"[0-9a-fA-F]+", text):
        return bytes.fromhex(text.decode())
    return data


def _cmd_sim_init(args: argparse.Namespace) -> int:
    import sgxsim

    plat = sgxsim.SimPlatform.init(args.dir)
    print(f"root CA:    {plat.directory / 'root_ca.pem'}")
    print(f"collateral: {plat.directory / 'collateral.json'}")
    return 0


def _cmd_quote(args: argparse.Namespace) -> int:
    report_data = _hex_arg(args.report_data, None, "--report-data")
    if len(report_data) > 64:
        raise DcapError("--report-data: at most 64 bytes")
    report_data = report_data.ljust(64, b"\0")
    options: dict[str, object] = {}
    if args.provider == "sim":
        options["sim_dir"] = args.sim_dir
        if args.mr_enclave:
            options["mr_enclave"] = _hex_arg(args.mr_enclave, 32, "--mr-enclave")
        if args.mr_signer:
            options["mr_signer"] = _hex_arg(args.mr_signer, 32, "--mr-signer")
        options.update(isv_prod_id=args.isv_prod_id, isv_svn=args.isv_svn, debug=args.debug, tcb=args.tcb)
    elif args.mr_enclave or args.mr_signer or args.debug:
        raise DcapError("--mr-enclave/--mr-signer/--debug only apply to the sim provider")
    provider = attester.get_provider(args.provider, **options)
    quote = provider.get_quote(report_data)
    if args.output:
        out = Path(args.output)
        out.write_bytes(quote)
        print(f"quote:      {out} ({len(quote)} bytes, provider {provider.name})")
        if args.provider == "sim":
            coll = out.with_name(out.name + ".collateral.json")
            coll.write_text(provider.platform.collateral().to_json())  # type: ignore[attr-defined]
            print(f"collateral: {coll}")
            print(f"root CA:    {Path(args.sim_dir) / 'root_ca.pem'}")
    else:
        print(quote.hex())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    quote = _read_quote_file(args.quote)
    root = dcap.load_root_ca(args.root_ca)
    source = pccs.open_collateral_source(args.collateral, args.pccs)
    result = dcap.Verifier(source, root_ca=root).verify(quote, now=args.now)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        d = result.to_dict()
        if "td" in d:   # a TD: its identity is the TD report's
            d = {**d, **d.pop("td")}  # type: ignore[dict-item]
            keys: tuple[str, ...] = ("tee_type", "status", "advisory_ids", "debug", "mr_td", "mr_seam",
                                     "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data",
                                     "tdx_module_identity", "fmspc", "collateral_expiry", "padding")
        else:
            keys = ("status", "advisory_ids", "mr_enclave", "mr_signer", "isv_prod_id", "isv_svn", "debug",
                    "report_data", "fmspc", "collateral_expiry")
        for key in keys:
            value = ", ".join(d[key]) if key == "advisory_ids" else d[key]  # type: ignore[arg-type]
            print(f"{key}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcap.py",
                                     description="SGX/TDX DCAP quotes: simulate, generate, verify.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sim-init", help="create (or reuse) a simulated SGX platform in DIR")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_sim_init)
    p = sub.add_parser("quote", help="generate a quote for report data")
    p.add_argument("--provider", choices=("sim", "occlum", "gramine", "tdx"), default=None,
                   help="default: detect (occlum, then gramine)")
    p.add_argument("--report-data", required=True, help="hex, up to 64 bytes (zero-padded)")
    p.add_argument("--sim-dir", default="sim")
    p.add_argument("--mr-enclave")
    p.add_argument("--mr-signer")
    p.add_argument("--isv-prod-id", type=int, default=0)
    p.add_argument("--isv-svn", type=int, default=0)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--tcb", default="UpToDate", help="sim platform TCB level, e.g. OutOfDate")
    p.add_argument("-o", "--output", help="write the quote here (default: hex on stdout)")
    p.set_defaults(func=_cmd_quote)
    p = sub.add_parser("verify", help="verify a quote; exit 0 only when genuine")
    p.add_argument("quote", help="quote file (raw bytes or hex)")
    p.add_argument("--collateral", help="collateral bundle (JSON, dcap-qvl QuoteCollateralV3 shape)")
    p.add_argument("--pccs", help="PCS/PCCS base URL (v4 API)")
    p.add_argument("--root-ca", help="trusted root (DER or PEM); default: the shipped Intel SGX Root CA")
    p.add_argument("--now", type=int, help="verification time, unix seconds (default: now)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_cmd_verify)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DcapError as exc:
        print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 1



if __name__ == "__main__":
    sys.exit(main())
