"""Hypervisor backends behind one interface (``core.py`` and ``x86.py``), chosen in one place.

Each backend module provides ``probe() -> (usable, reason, notes)`` and
``create_vm(vcpu_count, **options) -> VmOps``; ``registry.py`` lists them.
Backends that cannot exist on this platform are simply absent (psutil style):
probing them says why. Backends without in-kernel interrupt controllers get
the VM-level userspace irqchip (``irqchip/``) from ``open_vm``.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

from pyvmm.accel.registry import BY_NAME, NAMES
from pyvmm.errors import AccelError


@dataclass
class Probe:
    name: str
    usable: bool
    reason: str
    notes: list[str] = field(default_factory=list)


def _module(name: str):
    if name not in BY_NAME:
        raise AccelError(name, f"unknown accelerator; known: {', '.join(NAMES)}")
    return importlib.import_module(BY_NAME[name].module)


def probe(name: str) -> Probe:
    """Is backend ``name`` usable here, and exactly why not."""
    backend = BY_NAME.get(name)
    if backend is None:
        return Probe(name, False, f"unknown accelerator; known: {', '.join(NAMES)}")
    if not backend.exists_here():
        return Probe(name, False, f"only available on {backend.platform_name} (this host is {sys.platform})")
    try:
        module = _module(name)
    except ModuleNotFoundError as err:
        if err.name == backend.module:
            return Probe(name, False, "not implemented in this version of pyvmm")
        return Probe(name, False, f"cannot import {err.name}: {err}")
    except ImportError as err:
        return Probe(name, False, f"cannot be loaded: {err}")
    usable, reason, notes = module.probe()
    return Probe(name, usable, reason, list(notes))


def prepare_main_thread() -> None:
    """Call on the main thread before creating VMs on other threads (an API server's request
    threads): each backend that needs it sets up what only the main thread can (KVM: the
    signal handler that kicks vCPUs out of KVM_RUN)."""
    for backend in BY_NAME.values():
        if not backend.exists_here():
            continue
        try:
            module = _module(backend.name)
        except ImportError:
            continue
        prepare = getattr(module, "prepare_main_thread", None)
        if prepare is not None:
            prepare()


def probe_all() -> list[Probe]:
    return [probe(name) for name in NAMES]


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
        if BY_NAME[name].userspace_irqchip and "irqchip" not in options:
            from pyvmm.accel.irqchip import Irqchip

            options = {**options, "irqchip": Irqchip(vcpu_count)}
        return _module(name).create_vm(vcpu_count, **options), rejected
    if len(preference) == 1:
        raise AccelError(preference[0], f"not usable: {rejected[0].reason}")
    reasons = "; ".join(f"{p.name}: {p.reason}" for p in rejected)
    raise AccelError("accel", f"no usable accelerator ({reasons})")
