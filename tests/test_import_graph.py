"""The import structure of the first-party packages, read from their source (``ast``, nothing imported):
no import cycle inside a package, lazy imports (inside functions) included, since they are cycles all the
same; no module reaching into another module's private (``_name``) names, inside a package or from
``trainer`` into ``dler_kernels`` (whose private modules are its own business too); and every import of
``trainer`` (lazy ones included) going down its declared layers (``TRAINER_LAYERS``), with each folder's
``__init__.py`` a map of the folder."""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("dler_kernels", "trainer")
# Modules without Python source: the C++ extension setup.py builds from csrc/ (absent in a fresh clone).
COMPILED_MODULES = frozenset({"dler_kernels._C"})

# The layers of trainer, top to bottom, read from what each folder imports: a module may import its own unit
# (a folder, or a top-level module) and any unit of a layer below its own; never a unit of its own layer
# (siblings are independent) nor one above. config sits in the middle: its schema is made of the sections the
# rollout, reward and data units define (SamplingConfig, LengthPenaltyConfig, ...), and the distributed, update,
# run and checkpoint units are configured by it. dler_kernels is a leaf below all of trainer.
TRAINER_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("main", ("trainer.__main__",)),
    ("cli", ("trainer.cli",)),
    ("commands | loop", ("trainer.commands", "trainer.train")),  # the training loop never imports a command
    ("checkpoint", ("trainer.checkpoint",)),
    ("run | models", ("trainer.run", "trainer.models")),
    ("update", ("trainer.update",)),
    ("dist", ("trainer.dist",)),
    ("config", ("trainer.config",)),
    ("rollout", ("trainer.rollout",)),
    ("reward | data | model files", ("trainer.reward", "trainer.data", "trainer.model_files")),
    (
        "leaves",
        (
            "trainer.seeds",
            "trainer.progress",
            "trainer.devices",
            "trainer.chunking",
            "trainer.storage_errors",
            "trainer.signals",
        ),
    ),
    ("fsutil", ("trainer.fsutil", "trainer")),
    ("kernels", ("dler_kernels",)),
)
# Folders of trainer whose __init__.py only maps the folder (no imports): the package's layers stay visible.
MAP_ONLY_FOLDERS = ("checkpoint", "commands", "dist", "model_files", "models", "reward", "rollout", "run", "update")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class ImportGraph:
    """The modules of the packages under ``root`` (name -> source file) and what each one imports."""

    root: Path
    packages: tuple[str, ...]
    compiled: frozenset = frozenset()
    files: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, set[str]] = field(default_factory=dict)
    private_reaches: list[tuple[str, str]] = field(default_factory=list)  # (module, what it reaches)
    imports: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # module -> (first-party target, where)

    def __post_init__(self):
        for package in self.packages:
            for path in sorted((self.root / package).rglob("*.py")):
                parts = path.relative_to(self.root).with_suffix("").parts
                self.files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
        for module, path in self.files.items():
            self._read(module, path)

    def is_module(self, name: str) -> bool:
        return name in self.files or name in self.compiled

    def _package_of(self, name: str) -> str | None:
        head = name.split(".")[0]
        return head if head in self.packages else None

    def _read(self, module: str, path: Path) -> None:
        tree = ast.parse(path.read_text(), filename=str(path))
        self.edges[module] = set()
        bound: dict[str, str] = {}  # local name -> the first-party module it is bound to
        for node in ast.walk(tree):  # every import, at any depth: lazy ones inside functions too
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if self._package_of(alias.name):
                        self._import(module, alias.name, None, node)
                        bound[alias.asname or alias.name.split(".")[0]] = (
                            alias.name if alias.asname else alias.name.split(".")[0]
                        )
            elif isinstance(node, ast.ImportFrom):
                source = self._resolve(module, path, node)
                if not self._package_of(source):
                    continue
                for alias in node.names:
                    self._import(module, source, alias.name, node)
                    if self.is_module(f"{source}.{alias.name}"):
                        bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                self._check_attribute(module, path, node, bound)

    def _resolve(self, module: str, path: Path, node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module
        parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + (node.module.split(".") if node.module else []))

    def _import(self, module: str, source: str, name: str | None, node) -> None:
        """``import source`` (name None) or ``from source import name``, in ``module``."""
        target = f"{source}.{name}" if name is not None and self.is_module(f"{source}.{name}") else source
        here, there = self._package_of(module), self._package_of(target)
        if here == there and target in self.files and target != module:
            self.edges[module].add(target)
        where = f"{self.files[module].relative_to(self.root)}:{node.lineno}"
        if there is not None and target != module:
            self.imports.setdefault(module, []).append((target, where))
        if here != there and any(_private(p) for p in target.split(".")[1:]):
            self.private_reaches.append((module, f"{where}: {module} imports the private module {target}"))
        if name is not None and target == source and _private(name):
            self.private_reaches.append((module, f"{where}: {module} imports the private name {source}.{name}"))

    def _check_attribute(self, module: str, path: Path, node: ast.Attribute, bound: dict[str, str]) -> None:
        chain = []
        value = node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in bound or not chain:
            return
        chain.reverse()
        target = bound[value.id]
        for i, attr in enumerate(chain):  # walk down the submodules; the first other attribute is a name
            if self.is_module(f"{target}.{attr}"):
                target = f"{target}.{attr}"
                continue
            if i == len(chain) - 1 and _private(attr) and target != module:
                where = f"{path.relative_to(self.root)}:{node.lineno}"
                self.private_reaches.append((module, f"{where}: {module} reaches the private name {target}.{attr}"))
            return

    def cycle(self, package: str) -> list[str] | None:
        """One import cycle among the modules of ``package`` (``[a, b, ..., a]``), or None."""
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        path: list[str] = []

        def visit(m: str) -> list[str] | None:
            state[m] = 1
            path.append(m)
            for n in sorted(self.edges.get(m, ())):
                if state.get(n) == 1:
                    return path[path.index(n) :] + [n]
                if n not in state:
                    found = visit(n)
                    if found:
                        return found
            path.pop()
            state[m] = 2
            return None

        for m in sorted(self.files):
            if self._package_of(m) == package and m not in state:
                found = visit(m)
                if found:
                    return found
        return None

    def layer_violations(self, layers) -> list[str]:
        """Each import (lazy ones included) from a module to one of the same layer's other units or of a layer
        above; and each module in no declared unit. ``layers``: ``(name, (unit, ...))`` from top to bottom, a
        unit being a module or package name (its longest declared prefix places a module)."""
        layer_of = {unit: (i, name) for i, (name, units) in enumerate(layers) for unit in units}

        def unit_of(module: str) -> str | None:
            parts = module.split(".")
            for k in range(len(parts), 0, -1):
                if ".".join(parts[:k]) in layer_of:
                    return ".".join(parts[:k])
            return None

        problems = []
        for module in sorted(self.files):
            here = unit_of(module)
            if here is None:
                if self._package_of(module) in {unit.split(".")[0] for unit in layer_of}:
                    problems.append(f"{self.files[module].relative_to(self.root)}: {module} is in no declared layer")
                continue
            for target, where in self.imports.get(module, ()):
                there = unit_of(target)
                if there is None or there == here:
                    continue
                (i, name_here), (j, name_there) = layer_of[here], layer_of[there]
                if j <= i:
                    kind = "its own layer" if i == j else "a layer above"
                    problems.append(
                        f"{where}: {module} (layer {name_here!r}) imports {target} (layer {name_there!r}): "
                        f"{kind}; a module imports only its own unit ({here}) and the layers below"
                    )
        return problems

    def reaches_from(self, package: str) -> list[str]:
        """Each reach into a private name (or another package's private module) by a module of ``package``."""
        return list(dict.fromkeys(what for module, what in self.private_reaches if self._package_of(module) == package))


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph(ROOT, FIRST_PARTY, COMPILED_MODULES)


@pytest.mark.parametrize("package", FIRST_PARTY)
def test_no_module_of_the_package_is_part_of_an_import_cycle(graph, package):
    cycle = graph.cycle(package)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", FIRST_PARTY)
def test_no_module_of_the_package_reaches_into_another_modules_private_names(graph, package):
    reaches = graph.reaches_from(package)
    assert not reaches, "\n".join(reaches)


def test_every_import_of_trainer_goes_down_its_layers(graph):
    problems = graph.layer_violations(TRAINER_LAYERS)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("folder", sorted(p.name for p in (ROOT / "trainer").iterdir() if (p / "__init__.py").exists()))
def test_each_folder_of_trainer_maps_its_modules_in_its_init_docstring(folder):
    init = ROOT / "trainer" / folder / "__init__.py"
    tree = ast.parse(init.read_text())
    doc = ast.get_docstring(tree) or ""
    modules = sorted(p.stem for p in init.parent.glob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if not re.search(rf"(?<![\w.]){m}\b", doc)]
    assert not missing, f"trainer/{folder}/__init__.py's docstring does not name {missing}"
    if folder in MAP_ONLY_FOLDERS:
        imports = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not imports, f"trainer/{folder}/__init__.py imports (lines {imports}): import from the module itself"


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_finds_a_cycle_closed_by_a_lazy_import_inside_a_function(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import helper\n",
        "pkg/b.py": "def helper():\n    from . import c\n    return c\n",
        "pkg/sub/__init__.py": "",
        "pkg/c.py": "from .sub.d import thing\n",
        "pkg/sub/d.py": "import pkg.a\nthing = 1\n",
    })  # fmt: skip
    graph = ImportGraph(tmp_path, ("pkg",))
    assert graph.cycle("pkg") == ["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d", "pkg.a"]


def test_the_checker_finds_no_cycle_where_imports_only_go_one_way(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "from . import b\nfrom .b import g as f\n",
        "pkg/b.py": "import os\n\ndef g():\n    from . import c\n",
        "pkg/c.py": "",
    })  # fmt: skip
    assert ImportGraph(tmp_path, ("pkg",)).cycle("pkg") is None


def test_the_checker_finds_private_names_imported_or_reached_across_modules(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "__version__ = '1'\n",
        "pkg/_impl.py": "def _secret():\n    pass\n\ndef public():\n    pass\n",
        "pkg/a.py": "from ._impl import _secret\n",
        "pkg/b.py": "from . import _impl\n\ndef f():\n    return _impl._secret()\n",
        "pkg/c.py": (
            "import pkg._impl\nfrom . import _impl, __version__\nfrom ._impl import public\n\n"
            "def _own():\n    return pkg._impl.public(), _impl.public(), _own\n"
        ),
        "app/__init__.py": "",
        "app/main.py": "from pkg._impl import public\n\ndef f():\n    import pkg\n    return pkg.a._private\n",
    })  # fmt: skip
    graph = ImportGraph(tmp_path, ("pkg", "app"))
    assert graph.reaches_from("pkg") == [
        "pkg/a.py:1: pkg.a imports the private name pkg._impl._secret",
        "pkg/b.py:4: pkg.b reaches the private name pkg._impl._secret",
    ]  # c.py: a private module, public names and its own private name are fine
    assert graph.reaches_from("app") == [
        "app/main.py:1: app.main imports the private module pkg._impl",
        "app/main.py:5: app.main reaches the private name pkg.a._private",
    ]


def test_the_checker_finds_imports_against_the_layers_lazy_and_sideways_included(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/top.py": "from .low import base\nfrom .mid import a\n",
        "pkg/mid/__init__.py": "",
        "pkg/mid/a.py": "from . import b\nfrom ..low import base\n",
        "pkg/mid/b.py": "def f():\n    from .. import top\n    from ..side import s\n",
        "pkg/side.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/base.py": "import kern\n",
        "pkg/stray.py": "",
        "kern/__init__.py": "def g():\n    import pkg.low.base\n",
    })  # fmt: skip
    layers = (
        ("top", ("pkg.top",)),
        ("middle", ("pkg.mid", "pkg.side")),
        ("low", ("pkg.low", "pkg")),
        ("kernels", ("kern",)),
    )
    graph = ImportGraph(tmp_path, ("pkg", "kern"))
    assert graph.layer_violations(layers) == [
        "kern/__init__.py:2: kern (layer 'kernels') imports pkg.low.base (layer 'low'): a layer above; "
        "a module imports only its own unit (kern) and the layers below",
        "pkg/mid/b.py:2: pkg.mid.b (layer 'middle') imports pkg.top (layer 'top'): a layer above; "
        "a module imports only its own unit (pkg.mid) and the layers below",
        "pkg/mid/b.py:3: pkg.mid.b (layer 'middle') imports pkg.side (layer 'middle'): its own layer; "
        "a module imports only its own unit (pkg.mid) and the layers below",
    ]  # pkg.stray: in the unit "pkg" (the package itself), at the bottom of pkg's layers
