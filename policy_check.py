"""`asps_server.py check-policy FILE [--online]`: check a policy file without starting a server.

Who may import it: asps_server's check-policy subcommand, and tests. Offline it runs exactly
what the server runs when it loads a policy (at start and on SIGHUP), but lists every finding
instead of stopping at the first: each app, and each of its Vault references, is checked on its
own. ``--online`` then asks Vault/OpenBao: is each address reachable, do each app's credentials log
in, how long does the token live, may it read each of its own paths and none of another app's
(``sys/capabilities-self``). Output never carries a token, secret_id or secret value: findings are
built from policy.py's and kms.py's messages, which never quote them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

import kms
import policy

EXIT_OK = 0  # no error (warnings may have been printed)
EXIT_FINDINGS = 1  # the policy is invalid, or an online check failed
EXIT_USAGE = 2  # bad command line

# A login-method token living less than this is renewed very often; a static token (never renewed)
# living less than STATIC_TTL_WARN dies soon and takes the app's secrets with it.
LOGIN_TTL_WARN = 60
STATIC_TTL_WARN = 24 * 3600

HELP = """\
Check a policy file without starting a server.

Offline (always): everything the server checks when it loads the policy (at start and on SIGHUP),
each app and each Vault reference on its own, so that every problem is listed, naming the app and
the secret: references the KMS agent would refuse ('..', '//', '?', '%', empty segments), the
example's placeholder tokens, inline role_id/secret_id, missing credential files.

--online also asks each Vault/OpenBao address (sys/health) and, per app, logs in with its
credentials (or looks its static token up), prints the token's TTL (a warning when short), and
checks with sys/capabilities-self that the token can read each of the app's own paths and none of
another app's. Tokens made by a login for this check are revoked at the end.
"""

EPILOG = """\
exit codes:
  0  no error (warnings may have been printed)
  1  the policy is invalid, or an online check failed
  2  usage error
"""


@dataclass(frozen=True)
class Finding:
    """One line of the report. ``message`` already names the file, app and secret where relevant."""

    level: str  # "error", "warning" or "ok"
    message: str
    app: str | None = None
    secret: str | None = None

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


# --- offline -------------------------------------------------------------------------------------


def check_offline(path: str | Path) -> tuple[policy.Policy | None, list[Finding]]:
    """The loaded policy (None if it does not load) and every finding, errors first per app."""
    findings: list[Finding] = []
    try:
        pol = policy.load_policy(path)
    except policy.PolicyError as e:
        pol = None
        whole = str(e)
    else:
        whole = ""
        findings += [Finding("warning", w) for w in pol.warnings]
    if pol is None:
        findings += _per_app_errors(Path(path))
        if not any(f.message == whole for f in findings):
            findings.append(Finding("error", whole))
    return pol, findings


def _per_app_errors(path: Path) -> list[Finding]:
    """Each app, then each of its secrets, parsed alone: one load error per app and per secret."""
    try:
        data = policy._loads_relaxed(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, UnicodeDecodeError):
        return []  # load_policy's own message says what is wrong with the file
    if not isinstance(data, dict) or not isinstance(data.get("app_list"), list):
        return []
    found: list[Finding] = []
    for raw in data["app_list"]:
        if not isinstance(raw, dict):
            continue
        app_id = str(raw.get("id"))
        secrets = raw.get("secrets")
        names = [n for n in secrets if n != "_comment"] if isinstance(secrets, dict) else []
        bad_secret = False
        for name in names:
            alone = copy.deepcopy(raw)
            alone["secrets"] = {name: secrets[name]}
            error = _parse_error(data, alone, path)
            if error and f"'secrets.{name}'" in error:
                found.append(Finding("error", error, app_id, name))
                bad_secret = True
        if not bad_secret or len(names) > 1:
            error = _parse_error(data, raw, path)
            if error and not any(f.message == error for f in found):
                found.append(Finding("error", error, app_id))
    return found


def _parse_error(doc: dict[str, Any], app: dict[str, Any], path: Path) -> str | None:
    single = {**doc, "app_list": [app]}
    try:
        policy.parse_policy(single, source=str(path), base_dir=path.parent)
    except policy.PolicyError as e:
        return str(e)
    return None


# --- online --------------------------------------------------------------------------------------


def check_online(pol: policy.Policy) -> list[Finding]:
    """Reachability of every Vault node, then each app's login, TTL and capabilities."""
    agents = {app.id: app.agent for app in pol.apps if isinstance(app.agent, kms.VaultAgent)}
    if not agents:
        return [Finding("ok", f'{pol.source}: "kms": "{pol.kms}" has nothing to reach')]
    first = next(iter(agents.values()))
    findings = _reach(first.addrs, first.ca_file)
    # Each app's own API paths, found with its own token (KV v2 paths get 'data/').
    own: dict[str, dict[str, str]] = {}
    try:
        for app in pol.apps:
            agent = agents.get(app.id)
            if agent is not None:
                own[app.id] = {}
                findings += _check_app(app, agent, own[app.id])
        for app in pol.apps:
            agent = agents.get(app.id)
            if agent is not None and app.id in own:
                findings += _check_foreign(app, agent, own)
    finally:
        for agent in agents.values():
            with contextlib.suppress(kms.KmsError):
                agent.revoke_self()
    return findings


def _reach(nodes: Sequence[str], ca_file: str | None) -> list[Finding]:
    states = {200: "active", 429: "standby", 472: "DR secondary", 473: "performance standby"}
    findings: list[Finding] = []
    good = 0
    with requests.Session() as session:
        session.trust_env = False
        for node in nodes:
            try:
                reply = session.get(
                    f"{node}/v1/sys/health", verify=ca_file or True, timeout=(2, 5), allow_redirects=False
                )
            except requests.exceptions.SSLError as e:
                findings.append(Finding("error", f"Vault {node}: TLS error: {kms._short(e)}"))
                continue
            except requests.RequestException as e:
                findings.append(Finding("error", f"Vault {node}: unreachable: {kms._short(e)}"))
                continue
            state = states.get(reply.status_code)
            if state:
                good += 1
                findings.append(Finding("ok", f"Vault {node}: reachable, {state}"))
            else:
                what = {501: "not initialised", 503: "sealed"}.get(
                    reply.status_code, f"HTTP {reply.status_code}"
                )
                findings.append(Finding("error", f"Vault {node}: {what}"))
    if good and len(nodes) > 1:  # one node down in an HA cluster is worth a warning, not a failure
        findings = [Finding("warning", f.message) if f.level == "error" else f for f in findings]
    return findings


def _check_app(app: policy.AppPolicy, agent: kms.VaultAgent, paths: dict[str, str]) -> list[Finding]:
    who = f"app {app.id} ({agent.auth_method})"
    try:
        info = agent.token_info()
    except kms.KmsError as e:
        verb = "login" if agent.auth_method != "token" else "token lookup"
        return [Finding("error", f"{who}: {verb} failed: {e}", app.id)]
    findings = [Finding("ok", f"{who}: {_describe_token(info)}", app.id)]
    ttl = info.get("ttl")
    if isinstance(ttl, int) and ttl > 0:
        if agent.auth_method == "token" and ttl < STATIC_TTL_WARN:
            findings.append(
                Finding(
                    "warning",
                    f"{who}: the static token expires in {ttl}s and is not renewed by the server; use "
                    "a longer-lived token or an approle/cert login",
                    app.id,
                )
            )
        elif agent.auth_method != "token" and ttl < LOGIN_TTL_WARN:
            findings.append(
                Finding(
                    "warning",
                    f"{who}: token TTL {ttl}s is short: the server renews it every ~{max(ttl // 2, 1)}s",
                    app.id,
                )
            )
    for name, ref in app.paths.items():
        try:
            paths[name] = agent.api_path(ref)
        except kms.KmsError as e:
            findings.append(Finding("error", f"app {app.id}: secret {name!r}: {e}", app.id, name))
    if paths:
        try:
            caps = agent.capabilities(list(dict.fromkeys(paths.values())))
        except kms.KmsError as e:
            return [*findings, Finding("error", f"{who}: capabilities check failed: {e}", app.id)]
        for name, api_path in paths.items():
            have = caps.get(api_path, [])
            if _can_read(have):
                findings.append(
                    Finding("ok", f"app {app.id}: secret {name!r}: readable ({api_path})", app.id, name)
                )
            else:
                findings.append(
                    Finding(
                        "error",
                        f"app {app.id}: secret {name!r}: its token cannot read {api_path} "
                        f"(capabilities: {', '.join(have) or 'none'})",
                        app.id,
                        name,
                    )
                )
    return findings


def _check_foreign(
    app: policy.AppPolicy, agent: kms.VaultAgent, own: dict[str, dict[str, str]]
) -> list[Finding]:
    mine = set(own.get(app.id, {}).values())
    foreign = [
        (other, name, api_path)
        for other, paths in own.items()
        if other != app.id
        for name, api_path in paths.items()
        if api_path not in mine
    ]
    if not foreign:
        return []
    try:
        caps = agent.capabilities(list(dict.fromkeys(p for _, _, p in foreign)))
    except kms.KmsError as e:
        return [
            Finding("error", f"app {app.id}: capabilities check on other apps' paths failed: {e}", app.id)
        ]
    findings = [
        Finding(
            "error",
            f"app {app.id}: its token can read app {other}'s secret {name!r} ({api_path}): the "
            "Vault policy of its credentials is too wide",
            app.id,
            name,
        )
        for other, name, api_path in foreign
        if _can_read(caps.get(api_path, []))
    ]
    if not findings:
        findings.append(Finding("ok", f"app {app.id}: cannot read any other app's secret", app.id))
    return findings


def _can_read(capabilities: Sequence[str]) -> bool:
    return "deny" not in capabilities and bool({"read", "root", "sudo"} & set(capabilities))


def _describe_token(info: dict[str, Any]) -> str:
    ttl = info.get("ttl")
    life = "no expiry" if ttl == 0 else f"TTL {ttl}s" if isinstance(ttl, int) else "TTL unknown"
    renew = "renewable" if info.get("renewable") else "not renewable"
    policies = info.get("policies")
    names = ", ".join(str(p) for p in policies) if isinstance(policies, list) else "?"
    return f"token valid, {life}, {renew}, policies [{names}]"


# --- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asps_server.py check-policy",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="the policy file")
    p.add_argument("--online", action="store_true", help="also ask Vault/OpenBao (see above)")
    p.add_argument("--json", action="store_true", help="one JSON object per finding instead of text")
    return p


def main(argv: Sequence[str]) -> int:
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as e:  # argparse: 0 for --help, 2 for usage errors
        return int(e.code or 0)
    pol, findings = check_offline(args.file)
    if pol is not None:
        tds = sum(a.tee == "tdx" for a in pol.apps)
        kinds = f" ({len(pol.apps) - tds} enclave, {tds} TD)" if tds else ""
        loads = f"{pol.source}: loads: {len(pol.apps)} app(s){kinds}, kms {pol.kms!r}"
        findings.insert(0, Finding("ok", loads))
        if args.online:
            findings += check_online(pol)
    for f in findings:
        if args.json:
            print(json.dumps({"level": f.level, "app": f.app, "secret": f.secret, "message": f.message}))
        else:
            print(f)
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    if not args.json:
        print(f"{args.file}: {errors} error(s), {warnings} warning(s)")
    return EXIT_FINDINGS if errors else EXIT_OK
