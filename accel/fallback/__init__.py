"""The interpreter fallback: instructions the hypervisor cannot execute are stepped in software.

    policy   what a guest may be offered when the interpreter may step it (CPUID,
             the PVM host's kernel command line); imports no engine
    manager  ``FallbackManager``: moves a vCPU's state to the stepper
             (accel/stepper.py) and back, one instruction at a time, with counts
"""

from pyvmm.accel.fallback.manager import FallbackManager
from pyvmm.accel.fallback.policy import fallback_cpuid, interp_supported_cpuid, is_linux_kernel, pvm_kernel_cmdline

__all__ = ["FallbackManager", "fallback_cpuid", "interp_supported_cpuid", "is_linux_kernel", "pvm_kernel_cmdline"]
