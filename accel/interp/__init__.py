"""The bundled interpreter backend (``accel = "interp"``): a software x86-64 CPU on unicorn 2.1.4.

``InterpVm`` implements ``VmOps`` and its vCPUs ``VcpuOps`` (accel/ops.py) with a
userspace irqchip (accel/irqchip). ``probe()`` reports whether it can run here.
"""

from pyvmm.accel.interp.vm import InterpVm, probe


def create_vm(vcpu_count: int, **options) -> InterpVm:
    """The backend entry point ``accel.open_vm`` calls."""
    return InterpVm(vcpu_count, **options)


__all__ = ["InterpVm", "create_vm", "probe"]
