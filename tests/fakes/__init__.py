"""Fakes of the hypervisor APIs this host does not have (Hypervisor.framework, WHPX), for contract tests.

Each fake has the platform API's function names and signatures (cffi pointers in,
return codes out) and reports exits as the platform documents them; the source of
each documented behaviour is named where the fake relies on it. Guest code runs on
``cpu.TrappingCpu``: pyvmm's interpreter is the only x86 CPU this host can lend a
fake, and the fake uses it only as a CPU (it has no interrupt controller, and
every port, unbacked address, CPUID and HLT stops it before the instruction
completes, as a VM exit does).

``install(name)`` makes ``pyvmm.ffi.<platform>.load`` return the fake and lets
the backend's registry entry exist on this host; ``sitecustomize.py`` in
``tests/fakes/boot`` does it for ``pyvmm`` child processes when
``PYVMM_FAKE_PLATFORM`` is set.
"""

from __future__ import annotations

import dataclasses
import sys

FAKES = ("hvf", "whpx")


def install(name: str):
    """Route backend ``name`` to its fake in this process; returns ``(fake, undo)``."""
    from pyvmm.accel import registry

    if name == "hvf":
        from pyvmm.ffi import hvf as platform_ffi
        from fakes.hvf import FakeHypervisorFramework as Fake
    elif name == "whpx":
        from pyvmm.ffi import whpx as platform_ffi
        from fakes.whpx import FakeWinHv as Fake
    else:
        raise ValueError(f"no fake for {name!r}; fakes: {', '.join(FAKES)}")
    fake = Fake()
    old_load, old_entry = platform_ffi.load, registry.BY_NAME[name]
    # ffi.whpx.load() gives (WinHvPlatform, WinHvEmulation): the fake is both
    platform_ffi.load = (lambda *args, **kwargs: (fake, fake)) if name == "whpx" else (lambda *args, **kwargs: fake)
    registry.BY_NAME[name] = dataclasses.replace(old_entry, platforms=None)
    backend = sys.modules.get(old_entry.module)
    if backend is not None and hasattr(backend, "_library"):
        backend._library = None

    def undo() -> None:
        platform_ffi.load = old_load
        registry.BY_NAME[name] = old_entry
        if backend is not None and hasattr(backend, "_library"):
            backend._library = None

    return fake, undo
