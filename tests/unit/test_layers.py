"""The layers of ``src/fedsea`` (DESIGN.md, README "Layers of the code"): imports point down only.

Every ``import`` in every module (module level, inside functions and under ``TYPE_CHECKING``
alike) is read with ``ast``; a test fails on an arrow against the declared order, on the extra
rules below, and on any import cycle between modules (imports made only for type checkers
run nothing, so they do not count for cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "fedsea"

# Top to bottom: a module may import its own layer and the layers listed before it.
# ``core`` (settings, errors, small I/O helpers, the version) is usable by every layer.
ORDER: tuple[str, ...] = (
    "core",
    "model",
    "privacy",
    "training",
    "tasks",
    "wire",
    "server",
    "client",
    "federation",
    "flower",  # fedsea on Flower: the ServerApp/ClientApp over the federation's round logic
    "serving",  # the OpenAI-compatible endpoint on the client's machine, over a SplitClient
    "api",  # the root package ``fedsea``: re-exports the public API of the layers above
    "experiments",
    "cli",
)
CORE = {
    "fedsea.config",
    "fedsea.errors",
    "fedsea.io",
    "fedsea.lazy",
    "fedsea.limits",
    "fedsea.settings",
    "fedsea.version",
}
# Extra rules the linear order alone would allow: (importer layer, imported layer, why).
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("wire", "model", "wire knows no model"),
    ("wire", "privacy", "wire knows no model"),
    ("wire", "training", "wire knows no model"),
    ("wire", "tasks", "wire knows no model"),
    ("client", "server", "server and client meet only through wire"),
    ("serving", "server", "the endpoint runs on the client's machine: the text never reaches the trunk's code"),
)
# Third-party network code that the network-free layers must not import.
NETWORK_MODULES = ("grpc", "flwr", "socket")
NETWORK_FREE = ("core", "model", "privacy", "training", "tasks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    if module == "fedsea":
        return "api"
    if module in CORE:
        return "core"
    first = module.split(".")[1]
    if first not in ORDER:
        raise AssertionError(f"{module} belongs to no declared layer: add it to ORDER or CORE in {__file__}")
    return first


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "_pb2" not in p.name}


def _type_only_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports_of(module: str, path: Path, known: set[str], runtime_only: bool = False) -> tuple[set[str], set[str]]:
    """(fedsea modules imported, third-party top-level names imported) by one source file."""
    ours: set[str] = set()
    theirs: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_only_nodes(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.split(".")[0] == "fedsea" else theirs).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "fedsea":
                theirs.add(target)
                continue
            # ``from fedsea import tasks`` imports the module ``fedsea.tasks``.
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            ours |= subs or {target}
    ours = {_resolve(name, known) for name in ours}
    return ours - {module}, {name.split(".")[0] for name in theirs}


def _resolve(name: str, known: set[str]) -> str:
    while name not in known and "." in name:  # ``fedsea.wire.fedsea_pb2`` -> generated code of ``fedsea.wire``
        name = name.rsplit(".", 1)[0]
    return name


def graph(runtime_only: bool = False) -> dict[str, set[str]]:
    files = sources()
    known = set(files)
    return {m: imports_of(m, p, known, runtime_only)[0] for m, p in files.items()}


def test_every_module_is_in_a_layer() -> None:
    for module in sources():
        layer_of(module)


def test_imports_point_down_the_layers() -> None:
    bad = []
    for module, deps in graph().items():
        mine = ORDER.index(layer_of(module))
        for dep in sorted(deps):
            theirs = ORDER.index(layer_of(dep))
            if theirs > mine:
                bad.append(f"{module} ({layer_of(module)}) imports {dep} ({layer_of(dep)}), a layer below it")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


@pytest.mark.parametrize(("importer", "imported", "why"), FORBIDDEN)
def test_forbidden_arrows(importer: str, imported: str, why: str) -> None:
    bad = [
        f"{module} imports {dep}"
        for module, deps in graph().items()
        if layer_of(module) == importer
        for dep in deps
        if layer_of(dep) == imported
    ]
    assert not bad, f"{why}: " + "; ".join(bad)


def test_server_never_imports_client() -> None:
    bad = [f"{m} imports {d}" for m, deps in graph().items() if layer_of(m) == "server" for d in deps
           if layer_of(d) == "client"]  # fmt: skip
    assert not bad, "server and client meet only through wire: " + "; ".join(bad)


def test_network_free_layers_import_no_network_code() -> None:
    files = sources()
    known = set(files)
    bad = []
    for module, path in files.items():
        if layer_of(module) in NETWORK_FREE:
            _, theirs = imports_of(module, path, known)
            bad += [f"{module} imports {name}" for name in sorted(theirs & set(NETWORK_MODULES))]
    assert not bad, "the model, privacy, training and tasks layers know no network: " + "; ".join(bad)


def test_no_import_cycles() -> None:
    edges = graph(runtime_only=True)
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_bad_arrow(tmp_path: Path) -> None:
    """The reader resolves relative and ``from package import module`` forms (so the tests above can fail)."""
    fake = tmp_path / "fedsea" / "model" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..server import trunk\nfrom fedsea import client\nimport grpc\n")
    ours, theirs = imports_of("fedsea.model.bad", fake, {"fedsea.server.trunk", "fedsea.client"})
    assert ours == {"fedsea.server.trunk", "fedsea.client"}
    assert theirs == {"grpc"}
    assert ORDER.index(layer_of("fedsea.server.trunk")) > ORDER.index(layer_of("fedsea.model.bad"))
