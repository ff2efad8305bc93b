"""The one table of backends: what each is called, where it can exist, and the module that has it.

Config validation, ``pyvmm check``, ``accel = "auto"`` and the tests read it;
nothing else names backends. Importing this module imports no backend.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    #: the name in configs, on the command line and in ``VmOps.name``
    name: str
    #: what to call it in messages
    title: str
    module: str
    #: ``sys.platform`` prefixes where it can exist (None: everywhere)
    platforms: tuple[str, ...] | None
    platform_name: str = ""
    #: the backend takes the VM-level userspace irqchip (``accel.irqchip.Irqchip``)
    userspace_irqchip: bool = False

    def exists_here(self, platform: str | None = None) -> bool:
        platform = sys.platform if platform is None else platform
        return self.platforms is None or any(platform.startswith(p) for p in self.platforms)


BACKENDS = (
    Backend("kvm", "KVM", "pyvmm.accel.kvm", ("linux",), "Linux"),
    Backend("hvf", "Hypervisor.framework", "pyvmm.accel.hvf", ("darwin",), "macOS", userspace_irqchip=True),
    Backend("whpx", "WHPX", "pyvmm.accel.whpx", ("win32",), "Windows", userspace_irqchip=True),
    Backend("interp", "the interpreter", "pyvmm.accel.interp", None, userspace_irqchip=True),
)
BY_NAME = {backend.name: backend for backend in BACKENDS}
NAMES = tuple(BY_NAME)
#: what ``accel = "auto"`` tries, in order: hypervisors first, the interpreter last
AUTO_ORDER = NAMES
