"""pyvmm: a virtual machine monitor in Python.

The public surface is :mod:`pyvmm.api` (``VM``), :mod:`pyvmm.cli` and
:mod:`pyvmm.config`. The layers live in sub-packages: ``pyvmm.ffi`` (C
declarations), ``pyvmm.accel`` (hypervisor backends), ``pyvmm.vmm`` (memory,
buses, run loop, loaders, builder) and ``pyvmm.devices`` (device models).
"""

__version__ = "0.1.0"

from pyvmm.errors import (  # noqa: E402
    AccelError,
    BootError,
    ConfigError,
    DeviceError,
    GuestError,
    PyvmmError,
)

__all__ = ["__version__", "PyvmmError", "ConfigError", "AccelError", "BootError", "GuestError", "DeviceError", "VM"]


def __getattr__(name):  # lazy: importing pyvmm must stay cheap
    if name == "VM":
        from pyvmm.api import VM

        return VM
    raise AttributeError(name)
