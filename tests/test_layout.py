"""The module layout README "How it fits together" describes, checked against the code.

What `import asps_client` loads is the enclave side: it is copied into Occlum/Gramine images, so it
must hold exactly the modules below and no verifier, collateral, PCCS, native QVL, simulator, policy,
KMS or server code.  Among all top-level modules the imports form no cycle, and each module says
its job and who may import it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = frozenset({"asps_pb2", "asps_pb2_grpc", "secretmanager_pb2", "secretmanager_pb2_grpc"})
ENCLAVE_MODULES = frozenset({"asps_client", "asps_wire", "cli_env", "ratls_attest", "attester", "dcap_quote",
                             "asps_pb2", "asps_pb2_grpc"})
# In the enclave image but loaded only by the command line (asps_client.main), not by `import asps_client`.
ENCLAVE_CLI_ONLY = frozenset({"cli_env"})
# Imported by enclave-side code only on request, never by `import asps_client`: the legacy cczoo stubs
# (--legacy-cczoo) and the simulated platform (get_provider("sim"), for demos off SGX).
ENCLAVE_ON_REQUEST = frozenset({"secretmanager_pb2", "secretmanager_pb2_grpc", "sgxsim"})
# Issue 12: the enclave side stays within this many lines of our own code (stubs not counted).
ENCLAVE_LINE_BUDGET = 2500


def top_level_modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(REPO.glob("*.py"))}


def _is_main_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":`: runs only when the file is the script (module `__main__`), so
    what it imports is not an import of this module."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth (functions included)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    stack: list[ast.AST] = [n for n in tree.body if not _is_main_guard(n)]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        stack.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    mods = top_level_modules()
    return {name: (imported_modules(path) & set(mods)) - {name} for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


# Printed by a fresh interpreter: which of this checkout's own modules it has loaded (a JSON list).
PRINT_OUR_MODULES = (
    "repo = pathlib.Path.cwd().resolve()\n"
    "print(json.dumps(sorted(n for n, m in sys.modules.items()\n"
    "    if getattr(m, '__file__', None) and pathlib.Path(m.__file__).resolve().parent == repo)))\n"
)


def fresh_python(code: str, *args: str) -> str:
    """Run `code` in a new interpreter in the checkout, as an enclave or a server starts; its stdout."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_asps_client_loads_exactly_the_enclave_side():
    """A fresh interpreter, as in an enclave: which of our modules does `import asps_client` load?"""
    code = (
        "import json, pathlib, sys\n"
        "import asps_client\n"
        + PRINT_OUR_MODULES
        + "print(json.dumps('cryptography.x509' in sys.modules))\n"
    )
    modules, x509_loaded = fresh_python(code).splitlines()
    loaded = set(json.loads(modules))
    # cryptography.x509 is most of the cold start: imported when a certificate is made, not before
    assert json.loads(x509_loaded) is False
    at_import = ENCLAVE_MODULES - ENCLAVE_CLI_ONLY
    assert loaded == at_import, (f"extra: {sorted(loaded - at_import)}, "
                                 f"missing: {sorted(at_import - loaded)}")
    own = sorted(ENCLAVE_MODULES - GENERATED)
    lines = {name: len((REPO / f"{name}.py").read_text().splitlines()) for name in own}
    assert sum(lines.values()) <= ENCLAVE_LINE_BUDGET, lines


# Issue 12 (cold start): modules only some enclaves need load with the path that needs them, not with
# `import asps_client`: ctypes with the Occlum provider (its ioctl layout), pathlib with the Gramine and
# TDX providers (their pseudo-file trees), cbor2 with DICE evidence ("gramine" and "dice" formats).
PATH_ONLY_MODULES = ("ctypes", "pathlib", "cbor2")


def test_path_only_modules_load_with_their_path_not_with_the_import():
    code = (
        "import json, sys\n"
        f"names = {PATH_ONLY_MODULES!r}\n"
        "import asps_client, attester, ratls_attest\n"
        "print(json.dumps([n for n in names if n in sys.modules]))\n"
        "from cryptography.hazmat.primitives.asymmetric import ec\n"
        "ratls_attest.dice_claims(ec.generate_private_key(ec.SECP256R1()).public_key())\n"
        "attester.OcclumProvider('/nonexistent/sgx', ioctl=lambda *a: None)\n"
        "attester.GramineProvider('/nonexistent/attestation')\n"
        "print(json.dumps([n for n in names if n in sys.modules]))\n"
    )
    at_import, after_paths = (json.loads(line) for line in fresh_python(code).splitlines())
    assert at_import == []
    assert after_paths == list(PATH_ONLY_MODULES)


def test_enclave_side_code_imports_nothing_from_the_tenant_side():
    """Not even inside a function: a lazy `import dcap` in the client would still drag the verifier in."""
    graph = import_graph()
    for name in sorted(ENCLAVE_MODULES - GENERATED):
        outside = graph[name] - ENCLAVE_MODULES - ENCLAVE_ON_REQUEST
        assert not outside, f"{name} imports tenant-side module(s) {sorted(outside)}"


def test_no_import_cycle_among_top_level_modules():
    graph = import_graph()
    assert set(graph) >= ENCLAVE_MODULES | {"dcap", "pccs", "ratls", "sgxsim", "asps_server"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles():
    """The check above can fail: mutual and longer cycles are found, a diamond is not one."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_a_main_guard_import_is_not_an_import_of_the_module(tmp_path):
    """dcap.py's `__main__` block hands the command line to dcap_cli; only that block may name it."""
    src = tmp_path / "m.py"
    src.write_text("import a\n\ndef f():\n    import b\n\nif __name__ == '__main__':\n    import c\n")
    assert imported_modules(src) == {"a", "b"}
    assert "dcap_cli" not in import_graph()["dcap"]
    assert "dcap_cli" in {n.names[0].name for n in ast.walk(ast.parse((REPO / "dcap.py").read_text()))
                          if isinstance(n, ast.Import)}


def test_simulator_imports_only_the_formats():
    assert import_graph()["sgxsim"] == {"dcap_quote", "dcap_collateral"}


def test_verifier_knows_neither_sources_nor_certificates_nor_providers():
    graph = import_graph()
    assert graph["dcap_quote"] == set()
    assert graph["dcap"] == {"dcap_quote", "dcap_collateral", "x509_chain"}
    assert graph["x509_chain"] == set()
    assert graph["pccs"] == {"dcap", "dcap_quote", "dcap_collateral"}  # pccs serves dcap, not the reverse


def test_no_sys_modules_tricks():
    for name, path in top_level_modules().items():
        assert "sys.modules" not in path.read_text(), name


def test_every_module_says_its_job_and_who_may_import_it():
    for name, path in top_level_modules().items():
        if name in GENERATED:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{name} has no module docstring"
        assert "Who may import it:" in doc, f"{name}: the docstring does not say who may import it"


def test_occlum_and_gramine_copy_exactly_the_enclave_side():
    script = (REPO / "build_occlum_instance.sh").read_text()
    match = re.search(r'^ASPS_CLIENT_FILES="\$\{ASPS_CLIENT_FILES:-([^}]*)\}"', script, re.M)
    assert match, "ASPS_CLIENT_FILES default not found"
    occlum = {f.removesuffix(".py") for f in match.group(1).split() if f.endswith(".py")}
    assert occlum == ENCLAVE_MODULES
    template = (REPO / "asps_client.manifest.template").read_text()
    gramine = set(re.findall(r'"file:\{\{ asps_dir \}\}/(\w+)\.py"', template))
    assert gramine == ENCLAVE_MODULES | {"secretmanager_pb2", "secretmanager_pb2_grpc"}


def test_occlum_server_image_holds_every_module_the_server_loads(sim_platform):
    """What the server loads while it serves (a verification included: dcap imports x509_chain only
    when it verifies) and what check-policy loads must all be in the Occlum server image."""
    code = (
        "import json, pathlib, sys\n"
        "import asps_server, dcap, policy_check, sgxsim\n"
        "p = sgxsim.SimPlatform.init(sys.argv[1])\n"
        "dcap.Verifier(p.collateral(), root_ca=p.root_ca_der).verify(p.make_quote(b'x' * 64))\n"
        + PRINT_OUR_MODULES
    )
    loaded = set(json.loads(fresh_python(code, str(sim_platform.directory)))) - {"sgxsim", "dcap_cli"}
    # (sgxsim and dcap_cli: the test's own tools)
    assert "x509_chain" in loaded
    script = (REPO / "build_occlum_instance.sh").read_text()
    match = re.search(r'^ASPS_SERVER_FILES="\$\{ASPS_SERVER_FILES:-([^}]*)\}"', script, re.M)
    assert match, "ASPS_SERVER_FILES default not found"
    optional = re.search(r'^OPTIONAL_SERVER_FILES="([^"]*)"', script, re.M)
    assert optional, "OPTIONAL_SERVER_FILES not found"
    files = match.group(1).split() + optional.group(1).split()
    image = {f.removesuffix(".py") for f in files if f.endswith(".py")}
    assert loaded <= image, f"missing from the server image: {sorted(loaded - image)}"


def test_verify_evidence_takes_a_declared_verifier_protocol():
    """The seam is typed: verify_evidence names the QuoteVerifier Protocol, which dcap.Verifier meets."""
    import inspect

    import dcap
    import ratls

    assert inspect.signature(ratls.verify_evidence).parameters["verifier"].annotation == "QuoteVerifier"
    declared = inspect.signature(ratls.QuoteVerifier.verify)
    implemented = inspect.signature(dcap.Verifier.verify)
    assert list(declared.parameters) == list(implemented.parameters) == ["self", "quote", "now"]
    assert implemented.parameters["now"].kind is inspect.Parameter.KEYWORD_ONLY


def test_readme_how_it_fits_together_names_every_module():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## How it fits together"):readme.index("## Protocol")]
    for name in sorted(set(top_level_modules()) - GENERATED):
        assert f"`{name}.py`" in section, f"README 'How it fits together' does not place {name}.py"
    for name in sorted(ENCLAVE_MODULES - GENERATED):
        assert f"`{name}`" in section, f"README does not list {name} among what `import asps_client` loads"
