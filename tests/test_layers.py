"""The layers hold: no module imports a package at or above its own in the order written in
docs/architecture.md (imports inside functions count), and no module uses another's private
names. Static: every module under snp_ray/ is parsed with ``ast``, nothing is imported."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "snp_ray"
DOC = ROOT / "docs" / "architecture.md"

#: (importing file, imported module) -> why it may look up for now; each must still be needed
ALLOWED_UPWARD = {
}
#: files that may use another module's private names, and why; each must still be needed
ALLOWED_PRIVATE = {
}


def layer_order(text: str) -> dict[str, int]:
    """Layer name -> rank from the doc's ```layers block: one line a rank, lowest first; the
    names on one line share a rank (peers)."""
    block = re.search(r"^```layers\n(.*?)^```", text, flags=re.M | re.S)
    assert block, "docs/architecture.md has no ```layers block"
    ranks: dict[str, int] = {}
    for rank, line in enumerate(ln for ln in block.group(1).splitlines() if ln.strip()):
        for name in line.split():
            assert name not in ranks, f"layer {name} is listed twice"
            ranks[name] = rank
    return ranks


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """``snp_ray.slicing.graph`` -> ``slicing``; ``snp_ray.cli`` -> ``cli``; the root -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, snp_ray module) of every import anywhere in ``tree`` (in functions too), relative
    ones resolved; ``from snp_ray import x`` counts as ``snp_ray.x``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            if base == "snp_ray":
                out += [(node.lineno, f"snp_ray.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return [(line, m) for line, m in out if m == "snp_ray" or m.startswith("snp_ray.")]


def sources() -> dict[str, tuple[str, str, bool]]:
    """module -> (repository-relative path, source, is a package's __init__)."""
    return {module_name(p): (str(p.relative_to(ROOT)), p.read_text(), p.name == "__init__.py")
            for p in sorted(PKG.rglob("*.py"))}


def upward_imports(mods: dict[str, tuple[str, str, bool]], ranks: dict[str, int]
                   ) -> list[tuple[str, int, str, str]]:
    """(file, line, imported module, why) of every import that breaks the order."""
    bad = []
    for module, (path, text, is_package) in mods.items():
        src = layer_of(module)
        if src is None:                 # the package root re-exports; nothing imports it
            continue
        if src not in ranks:
            bad.append((path, 0, module, f"package {src} is not in the documented layers"))
            continue
        for line, target in imported_modules(ast.parse(text), module, is_package):
            dst = layer_of(target)
            if dst is None:
                bad.append((path, line, target, "imports the package root; import the module"))
            elif dst == src:
                continue
            elif dst not in ranks:
                bad.append((path, line, target, f"package {dst} is not in the documented layers"))
            elif ranks[dst] >= ranks[src]:
                how = "a peer" if ranks[dst] == ranks[src] else "a layer above"
                bad.append((path, line, target, f"{src} imports {dst}, {how}"))
    return bad


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_private_names(tree: ast.AST) -> set[str]:
    """Private names a module binds: functions, classes, assigned names and attributes."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
    return {n for n in out if _private(n)}


def private_uses(mods: dict[str, tuple[str, str, bool]]) -> list[tuple[str, int, str]]:
    """(file, line, what) of every use of another snp_ray module's private name: imported by
    name, or read as ``x._name`` where only other modules define ``_name``."""
    trees = {m: ast.parse(text) for m, (_, text, _) in mods.items()}
    defined = {m: defined_private_names(t) for m, t in trees.items()}
    bad = []
    for module, tree in trees.items():
        path = mods[module][0]
        elsewhere = set().union(*(d for m, d in defined.items() if m != module)) - defined[module]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("snp_ray"):
                bad += [(path, node.lineno, f"from {node.module} import {a.name}")
                        for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and node.attr in elsewhere:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    bad.append((path, node.lineno, ast.unparse(node)))
    return bad


def test_no_module_imports_a_layer_above_its_own():
    ranks = layer_order(DOC.read_text())
    mods = sources()
    assert len(mods) > 50, "nothing scanned"
    on_disk = {layer_of(m) for m in mods} - {None}
    assert on_disk <= set(ranks), f"packages missing from the layers: {sorted(on_disk - set(ranks))}"
    bad = upward_imports(mods, ranks)
    used = {(path, target) for path, _, target, _ in bad if (path, target) in ALLOWED_UPWARD}
    left = [b for b in bad if (b[0], b[2]) not in ALLOWED_UPWARD]
    assert not left, "imports against docs/architecture.md's layers:\n" + "\n".join(
        f"  {path}:{line} {target}: {why}" for path, line, target, why in left)
    assert used == set(ALLOWED_UPWARD), f"allowed but no longer needed: {set(ALLOWED_UPWARD) - used}"


def test_no_module_uses_another_modules_private_names():
    bad = private_uses(sources())
    used = {path for path, _, _ in bad if path in ALLOWED_PRIVATE}
    left = [b for b in bad if b[0] not in ALLOWED_PRIVATE]
    assert not left, "private names used across modules:\n" + "\n".join(
        f"  {path}:{line} {what}" for path, line, what in left)
    assert used == set(ALLOWED_PRIVATE), f"allowed but no longer needed: {set(ALLOWED_PRIVATE) - used}"


RANKS = {"errors": 0, "data": 1, "models": 2, "baselines": 3, "tuning": 3, "cli": 4}


@pytest.mark.parametrize("text, why", [
    ("from snp_ray.cli import main\n", "data imports cli, a layer above"),
    ("def f():\n    import snp_ray.models.base\n", "data imports models, a layer above"),
    ("from ..models import base\n", "data imports models, a layer above"),
    ("from snp_ray import cli\n", "data imports cli, a layer above"),
    ("import snp_ray\n", "imports the package root; import the module"),
    ("from snp_ray.nowhere import x\n", "package nowhere is not in the documented layers"),
])
def test_an_upward_import_is_caught(text, why):
    mods = {"snp_ray.data.bad": ("snp_ray/data/bad.py", text, False),
            "snp_ray.data.good": ("snp_ray/data/good.py", "from snp_ray.errors import SnpError\n"
                                  "from snp_ray.data import bad\n", False)}
    bad = upward_imports(mods, RANKS)
    assert [(path, b_why) for path, _, _, b_why in bad] == [("snp_ray/data/bad.py", why)]


def test_a_peer_import_and_an_unlisted_package_are_caught():
    mods = {"snp_ray.tuning.x": ("snp_ray/tuning/x.py", "from snp_ray.baselines import y\n", False),
            "snp_ray.newpkg.z": ("snp_ray/newpkg/z.py", "", False)}
    whys = sorted(why for *_, why in upward_imports(mods, RANKS))
    assert whys == ["package newpkg is not in the documented layers", "tuning imports baselines, a peer"]


def test_the_doc_order_is_parsed_with_peers():
    ranks = layer_order("text\n```layers\nerrors\nserve client\ncli\n```\nmore\n")
    assert ranks == {"errors": 0, "serve": 1, "client": 1, "cli": 2}


def test_a_private_name_used_across_modules_is_caught():
    mods = {"snp_ray.a": ("snp_ray/a.py", "def _helper():\n    pass\n\nclass A:\n"
                          "    def __init__(self):\n        self._state = 1\n"
                          "        self._own = 2\n\n    def f(self, other):\n"
                          "        return other._own, self.__class__\n", False),
            "snp_ray.b": ("snp_ray/b.py", "from snp_ray.a import _helper\n"
                          "def g(a):\n    return a._state, a.__dict__\n", False)}
    assert sorted(what for *_, what in private_uses(mods)) == ["a._state", "from snp_ray.a import _helper"]


def test_every_handled_module_type_stays_one_module_in_a_trace():
    """The tracer lives below slicing (models/tracing.py) with its own list of leaf types; a
    handler whose module type the tracer would inline could never be called."""
    from snp_ray.models.tracing import LEAF_TYPES, is_leaf
    from snp_ray.slicing.handlers import HANDLERS, register_handler

    assert all(issubclass(t, tuple(LEAF_TYPES)) for t in HANDLERS)

    class Mine(nn.Module):
        def forward(self, x):
            return x

    remove = register_handler(Mine, HANDLERS[nn.Linear])
    assert is_leaf(Mine())
    remove()
    assert not is_leaf(Mine())
