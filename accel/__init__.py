"""Hypervisor backends behind one interface (see ``ops.py``), chosen in one place.

Each backend module provides ``probe() -> (usable, reason, notes)`` and
``create_vm(vcpu_count, **options) -> VmOps``. Backends that cannot exist on
this platform are simply absent (psutil style): probing them says why.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

from pyvmm.errors import AccelError

_MODULES = {
    "kvm": "pyvmm.accel.kvm",
    "hvf": "pyvmm.accel.hvf",
    "whpx": "pyvmm.accel.whpx",
    "interp": "pyvmm.accel.interp",
}
_PLATFORMS = {"kvm": ("linux", "Linux"), "hvf": ("darwin", "macOS"), "whpx": ("win32", "Windows")}


@dataclass
class Probe:
    name: str
    usable: bool
    reason: str
    notes: list[str] = field(default_factory=list)


def _module(name: str):
    if name not in _MODULES:
        raise AccelError(name, f"unknown accelerator; known: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name])


def probe(name: str) -> Probe:
    """Is backend ``name`` usable here, and exactly why not."""
    platform = _PLATFORMS.get(name)
    if platform and not sys.platform.startswith(platform[0]):
        return Probe(name, False, f"only available on {platform[1]} (this host is {sys.platform})")
    try:
        module = _module(name)
    except ModuleNotFoundError as err:
        if err.name == _MODULES[name]:
            return Probe(name, False, "not implemented in this version of pyvmm")
        return Probe(name, False, f"cannot import {err.name}: {err}")
    except ImportError as err:
        return Probe(name, False, f"cannot be loaded: {err}")
    usable, reason, notes = module.probe()
    return Probe(name, usable, reason, list(notes))


def probe_all() -> list[Probe]:
    return [probe(name) for name in _MODULES]


def open_vm(preference: list[str], vcpu_count: int, **options):
    """Create a VM on the first usable backend in ``preference``.

    Returns ``(vm, rejected)`` where ``rejected`` lists the probes of the
    backends skipped before it, so callers can log why.
    """
    rejected: list[Probe] = []
    for name in preference:
        result = probe(name)
        if not result.usable:
            rejected.append(result)
            continue
        return _module(name).create_vm(vcpu_count, **options), rejected
    if len(preference) == 1:
        raise AccelError(preference[0], f"not usable: {rejected[0].reason}")
    reasons = "; ".join(f"{p.name}: {p.reason}" for p in rejected)
    raise AccelError("accel", f"no usable accelerator ({reasons})")
