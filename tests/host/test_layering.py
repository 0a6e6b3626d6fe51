"""Import direction of the package: every module imports only modules of lower layers.

The layers, bottom up: the compiled engine; the OS bindings (errors, libc, native); memlock;
the VFIO uapi and sysfs discovery; the container; DMA memory; the PCI device; the NVMe driver
(its pure tables and codecs below its queues, namespaces and controller); the tools (testing,
cli, demo); the package's own __init__. The rules are read from the source (ast), so an
upward import, even a late one inside a function, fails here before it can make a cycle.
Imports under `if TYPE_CHECKING:` are exempt: they exist for annotations only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "iommu_dma"
ROOT = "iommu_dma"

# Bottom up; a module may import modules of strictly lower layers. Entries ending in ".*" match
# a whole subpackage; in a layer marked free, its modules may also import each other.
LAYERS: list[tuple[str, tuple[str, ...], bool]] = [
    ("compiled engine", ("iommu_dma._native", "iommu_dma._native_asan",
                         "iommu_dma._native_sim"), False),
    ("os", ("iommu_dma.errors", "iommu_dma.libc", "iommu_dma.native"), False),
    ("memlock", ("iommu_dma.memlock",), False),
    ("vfio", ("iommu_dma.vfio", "iommu_dma.discovery"), False),
    ("iommufd", ("iommu_dma.iommufd",), False),
    ("iommu backends", ("iommu_dma.backends",), False),
    ("container", ("iommu_dma.container",), False),
    ("memory", ("iommu_dma.memory",), False),
    ("pci", ("iommu_dma.pci",), False),
    ("nvme constants", ("iommu_dma.nvme.constants",), False),
    ("nvme codecs", ("iommu_dma.nvme.status", "iommu_dma.nvme.identify",
                     "iommu_dma.nvme.regs"), False),
    ("nvme commands", ("iommu_dma.nvme.sqe", "iommu_dma.nvme", "iommu_dma.nvme.recovery"),
     False),
    ("nvme protection", ("iommu_dma.nvme.pi",), False),
    ("nvme engine", ("iommu_dma.nvme.queue", "iommu_dma.nvme.dbbuf",
                     "iommu_dma.nvme.interrupts"), False),
    ("nvme queues", ("iommu_dma.nvme.ioqueue",), False),
    ("nvme asyncio", ("iommu_dma.nvme.aio",), False),
    ("nvme namespace", ("iommu_dma.nvme.namespace", "iommu_dma.nvme.health",
                        "iommu_dma.nvme.events"), False),
    ("nvme controller", ("iommu_dma.nvme.controller", "iommu_dma.nvme.perf",
                         "iommu_dma.nvme.*"), False),
    ("nbd export", ("iommu_dma.nbd", "iommu_dma.nbd.export"), False),
    ("nbd server", ("iommu_dma.nbd.plugin", "iommu_dma.nbd.server"), False),
    ("testing", ("iommu_dma.testing", "iommu_dma.testing.*"), True),
    ("cli", ("iommu_dma.cli", "iommu_dma.cli.*"), True),
    ("demo", ("iommu_dma.demo",), False),
    ("package", (ROOT,), False),
]

# Where each libc call may be bound: one ctypes.CDLL for the whole package.
CDLL_HOME = {"iommu_dma.libc"}
CDLL_PENDING: set[str] = set()      # none left: every module binds libc through libc.py


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int:
    """Index in LAYERS; exact names win over subpackage patterns."""
    for exact in (True, False):
        for i, (_, members, _) in enumerate(LAYERS):
            for m in members:
                if exact and m == name:
                    return i
                if not exact and m.endswith(".*") and name.startswith(m[:-1]):
                    return i
    raise LookupError(f"{name} is in no layer: add it to LAYERS in {__file__}")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, known: dict[str, Path]) -> str:
    """`from pkg import x` imports module pkg.x when there is one, else pkg itself."""
    return name if name in known else name.rsplit(".", 1)[0]


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The iommu_dma modules `name` imports at run time (module level or inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            out.update(_resolve(f"{base}.{a.name}", known) for a in node.names)
    return {m for m in out if m == ROOT or m.startswith(ROOT + ".")}


def upward_imports() -> list[str]:
    known = modules()
    bad = []
    for name, path in known.items():
        mine = layer_of(name)
        free = LAYERS[mine][2]
        for target in sorted(imports_of(name, path, known) - {name}):
            if target == ROOT and name != ROOT:
                continue            # the package itself: imported before any submodule anyway
            theirs = layer_of(target)
            if theirs > mine or (theirs == mine and not free):
                bad.append(f"{name} ({LAYERS[mine][0]}) imports {target} "
                           f"({LAYERS[theirs][0]})")
    return bad


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_imports_point_down() -> None:
    assert upward_imports() == []


def test_vfio_imports_only_the_os_layer() -> None:
    known = modules()
    got = imports_of("iommu_dma.vfio", known["iommu_dma.vfio"], known)
    assert got <= {"iommu_dma.errors", "iommu_dma.libc", "iommu_dma.memlock"}, got


def test_one_cdll() -> None:
    holders = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("CDLL", "cdll", "LoadLibrary"):
                holders.add(name)
    assert holders - CDLL_PENDING == CDLL_HOME


@pytest.mark.parametrize("source, expected", [
    ("from iommu_dma.memory import PAGE\n", {"iommu_dma.memory"}),
    ("def f():\n    from iommu_dma import memory\n", {"iommu_dma.memory"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import iommu_dma.pci\n", set()),
    ("from . import libc\n", {"iommu_dma.libc"}),
])
def test_import_reader(tmp_path: Path, source: str, expected: set[str]) -> None:
    """The reader sees late imports, resolves relative ones and skips TYPE_CHECKING blocks."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imports_of("iommu_dma.probe", path, modules()) == expected


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """vfio importing memory would be reported."""
    known = modules()
    path = tmp_path / "vfio.py"
    path.write_text("def f():\n    from iommu_dma.memory import locked_bytes\n")
    got = imports_of("iommu_dma.vfio", path, known)
    assert any(layer_of(t) > layer_of("iommu_dma.vfio") for t in got)
