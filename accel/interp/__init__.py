"""The bundled interpreter backend (``accel = "interp"``): a software x86-64 CPU on unicorn 2.1.4.

``InterpVm`` implements ``VmOps`` and its vCPUs ``VcpuOps`` (accel/core.py, accel/x86.py) over
the same guest memory the VMM allocates (``mem_map_ptr``, no copy), with the
userspace irqchip (accel/irqchip) serving the PIC/PIT/LAPIC/IOAPIC inside the
backend, as KVM's in-kernel irqchip does. ``probe()`` says whether it can run.

Modules:
    context  offsets into unicorn's saved context and engine structures, all
             verified at start-up (``verify_layout``), and the two engine fixes:
             stops only between translation blocks, and HLT detection
    system   what unicorn leaves out: IDT delivery (real/protected/long mode,
             IST, TSS stack switches, #DF/triple fault), syscall, sysenter,
             a page walker for the backend's own guest-virtual accesses
    cpuid    the CPUID table the engine really executes, TSC frequency
    vcpu     the engine thread, exit hand-off, injection, HLT sleep, kicker
    redirect RDMSR/WRMSR/CR8: unicorn's helpers patched to call the vCPU
    vm       ``InterpVm`` and ``probe``

Measured here (2 shared cores): a port-I/O or MMIO exit round trip through
``run()`` costs 7-8 us idle (~21 us under load); an exception or interrupt
delivered through the IDT and returned from costs ~110 us, an emulated
``syscall`` + ``sysretq`` ~100 us (both handled in Python between engine runs);
Debian's 6.1 cloud kernel boots to its initramfs /init and reboots in ~3-5 s
(64-bit entry or PVH, 1 or 2 vCPUs), also through ``pyvmm boot``.

Limits (unicorn 2.1.4 has no hooks for them):
    * RDMSR/WRMSR and MOV CR8 reach the vCPU through unicorn's redirected helpers
      (``redirect``): IA32_APIC_BASE is the irqchip's, IA32_TSC and IA32_TSC_ADJUST move
      together, IA32_TSC_DEADLINE arms the LAPIC, CR8 is the LAPIC's TPR; the MSRs unicorn
      implements stay its own; any other is #GP as on a CPU without it (unless another backend's
      state brought it along), as is a non-canonical base address. Where the redirection cannot
      be installed (another unicorn build, Windows), unicorn's behaviour is kept: APIC_BASE and
      CR8 read 0, unknown MSRs read 0 and drop writes.
    * NMIs are delivered without NMI blocking until IRET (IRET is not hookable).
    * An interrupt pending while IF=0 is retried after 20 us .. 1 ms (there is
      no hook on STI/POPF/IRET).
    * MMIO wider than 4 bytes is split in 4-byte exits; instruction fetch from
      MMIO reads through exits; writes to read-only slots end in InternalError.
    * vCPUs run one at a time (LOCK-prefixed instructions are not atomic across
      engines); self-modifying code written by one vCPU is seen by another
      only after it re-translates (INIT/SIPI flush; others do not).
"""

from pyvmm.accel.interp.vm import InterpVm, probe


def create_vm(vcpu_count: int, **options) -> InterpVm:
    """The backend entry point ``accel.open_vm`` calls."""
    return InterpVm(vcpu_count, **options)


__all__ = ["InterpVm", "create_vm", "probe"]
