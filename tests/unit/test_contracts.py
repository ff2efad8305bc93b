"""Architecture rules the folder tree promises, checked on the source (no imports executed)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def sources(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


def test_devices_never_import_accel():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith("pyvmm.accel"))
        for path in sources("devices")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_accel_never_imports_vmm():
    """Backends know nothing of the VMM above them: constants they share live in arch/."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith("pyvmm.vmm"))
        for path in sources("accel")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_arch_is_a_leaf():
    for path in sources("arch"):
        ours = {m for m in imported_modules(path) if m.startswith("pyvmm") and not m.startswith("pyvmm.arch")}
        assert not ours, f"{path.relative_to(ROOT)} imports {ours}: arch/ imports nothing of pyvmm outside arch/"


def test_only_the_engine_module_creates_unicorn_engines():
    """One unicorn wrapper: every Uc(...) is made in accel/interp/engine.py."""
    makers = []
    for folder in ("accel", "vmm", "devices", "pyvmm"):
        for path in sources(folder):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Uc":
                    makers.append(str(path.relative_to(ROOT)))
    assert set(makers) == {"accel/interp/engine.py"}


def test_guest_memory_is_a_leaf():
    ours = {m for m in imported_modules(ROOT / "vmm" / "memory.py") if m.startswith("pyvmm")}
    assert ours <= {"pyvmm.errors", "pyvmm.host"}


def test_host_services_import_only_errors():
    """host/ sits under everything: devices, vmm and the CLI use it; it uses nothing of theirs."""
    for path in sources("host"):
        ours = {m for m in imported_modules(path) if m.startswith("pyvmm")}
        assert ours <= {"pyvmm.errors"}, f"{path.relative_to(ROOT)} imports {ours}"


def test_ffi_declares_only():
    for path in sources("ffi"):
        ours = {m for m in imported_modules(path) if m.startswith("pyvmm")}
        assert not ours, f"{path.name} imports {ours}: ffi/ holds C declarations only"


def test_every_package_folder_is_installed():
    """pyproject's explicit package list must name every folder with an __init__.py."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapping = {folder: package for package, folder in setuptools["package-dir"].items()}
    assert set(mapping) == {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}, "a top folder is not mapped"
    found = set()
    for top, package in mapping.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([package, *rel.parts]))
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"
