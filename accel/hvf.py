"""The Hypervisor.framework backend (Intel Macs): x86_64 guests through the VMX API of ``ffi/hvf.py``.

As QEMU's hvf accelerator does, the VMM owns the interrupt controllers (the
userspace irqchip, ``hvcore.py``) and decodes every exit from the VMCS: I/O
from the exit qualification (string I/O and MMIO, which VMX reports as an EPT
violation without decoding the instruction, are executed by the interpreter's
stepper), CPUID from the vCPU's table, HLT, MSRs, XSETBV, CR0/CR4 writes to
the bits VMX itself needs (NE, PG, VMXE: their guest view lives in the read
shadows), interrupt windows, triple faults.

Guest debugging (``set_guest_debug``, hvcore.py): the VMCS exception bitmap
(VMCS_CTRL_EXC_BITMAP, bit 1 #DB, bit 3 #BP; Intel SDM vol. 3C 24.6.3) makes the
debugger's exceptions exit as "exception or NMI" (reason 0) with the VM-exit
interruption information (VMCS_RO_VMEXIT_IRQ_INFO) and, for #DB, DR6's bits in the
exit qualification (SDM 27.2.1, Table 27-1; DR6 itself is not written, SDM 27.1);
single steps set RFLAGS.TF; DR0-DR3 are hv_vcpu_write_register(HV_X86_DR0..3) and
DR7 the guest-state field VMCS_GUEST_DR7 (hv_arch_x86.h, hv_arch_vmx.h). The guest's
own #BP goes back in as a software exception with the exit's instruction length
(SDM 26.6.1.3), its own #DB as a hardware exception with DR6 written.

Hypervisor.framework binds a vCPU to the thread that created it: every call on
a vCPU except ``hv_vcpu_interrupt`` must come from that thread. Each vCPU here
therefore has its own owner thread, which runs the whole run loop; calls from
other threads are handed to it (between runs).

Never run on real hardware here: contract-tested against tests/fakes/hvf.py,
which follows Apple's headers and the Intel SDM (README, "Where it ran").
"""

from __future__ import annotations

import platform
import queue
import threading

from pyvmm.accel import vmx
from pyvmm.accel.core import Capability, GuestDebug, InternalError, Shutdown
from pyvmm.accel.hvcore import BP, DB, DR7_ENABLE, HypervisorVcpu, HypervisorVm, page_aligned
from pyvmm.accel.x86 import (
    ARCH,
    SHADOW_MOV_SS,
    SHADOW_STI,
    DescriptorTable,
    FpuState,
    PendingEvents,
    Regs,
    SpecialRegs,
    fpu_from_fxsave,
    fpu_into_xsave,
)
from pyvmm.arch.x86 import msrs as m
from pyvmm.arch.x86.msrs import EFER_LMA, EFER_LME
from pyvmm.arch.x86.registers import CR0_NE, CR0_PG, CR4_VMXE, RFLAGS_IF
from pyvmm.errors import AccelError
from pyvmm.ffi import hvf as h

TITLE = "Hypervisor.framework"
FPSTATE_SIZE = 4096  # an XSAVE area, as QEMU's hvf reads it
HV_CAP_VCPUMAX = 0

#: MSRs the guest reads and writes without exits (QEMU's hvf list); the rest exit to the VMM
NATIVE_MSRS = (m.MSR_STAR, m.MSR_LSTAR, m.MSR_CSTAR, m.MSR_SYSCALL_MASK, m.MSR_FS_BASE, m.MSR_GS_BASE,
               m.MSR_KERNEL_GS_BASE, m.MSR_TSC_AUX, m.MSR_IA32_TSC, m.MSR_IA32_SYSENTER_CS,
               m.MSR_IA32_SYSENTER_ESP, m.MSR_IA32_SYSENTER_EIP)  # fmt: skip
CR0_HOST_OWNED = CR0_NE | CR0_PG  # NE: VMX requires it set; PG: long-mode activation is the VMM's to do
CR4_HOST_OWNED = CR4_VMXE  # VMX requires it set; the guest must not see it
_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
              "r14", "r15")  # the GPR numbering of MOV-CR and instruction-information fields  # fmt: skip
_REG_FIELDS = tuple(Regs.__dataclass_fields__)
_COMPLETED_BY_VMM = frozenset({h.VMX_REASON_IO, h.VMX_REASON_EPT_VIOLATION, h.VMX_REASON_HLT, h.VMX_REASON_CPUID,
                               h.VMX_REASON_RDMSR, h.VMX_REASON_WRMSR, h.VMX_REASON_XSETBV, h.VMX_REASON_MOV_CR})  # fmt: skip

_library = None


def _load():
    global _library
    if _library is None:
        _library = h.load(h.intel)
    return _library


def _check(rc: int, what: str) -> None:
    if rc & 0xFFFFFFFF:
        raise AccelError("hvf", f"{what} failed: {h.return_text(rc)}")


_SIGN_HELP = ("sign the Python binary with the com.apple.security.hypervisor entitlement: write an "
              "entitlements plist with <key>com.apple.security.hypervisor</key><true/> and run "
              "codesign --sign - --force --entitlements hv.plist \"$(python3 -c 'import sys; print(sys.executable)')\"")  # fmt: skip


def probe() -> tuple[bool, str, list[str]]:
    """For ``pyvmm check``: can a VM be created here, and exactly why not."""
    notes = ["CPUID: the interpreter's baseline x86-64 model (no AVX), not yet the host's full feature set",
             "never run on real hardware by the project: contract-tested against a fake of the documented API"]
    if platform.machine() in ("arm64", "aarch64"):
        return False, ("Apple Silicon: Hypervisor.framework runs only arm64 guests there; "
                       "x86_64 guests use the interpreter (accel = \"interp\")"), notes  # fmt: skip
    try:
        lib = _load()
    except OSError as err:
        return False, f"cannot load {h.FRAMEWORK}: {err}", notes
    rc = lib.hv_vm_create(h.HV_VM_DEFAULT) & 0xFFFFFFFF
    if rc == h.HV_SUCCESS:
        lib.hv_vm_destroy()
        return True, "hv_vm_create succeeded (VMX API)", notes
    if rc == h.HV_BUSY:
        return True, "a VM already exists in this process (one per process)", notes
    if rc == h.HV_DENIED:
        return False, f"hv_vm_create: HV_DENIED, this process lacks the entitlement; {_SIGN_HELP}", notes
    if rc == h.HV_UNSUPPORTED:
        return False, ("hv_vm_create: HV_UNSUPPORTED, no usable VMX here (a Mac VM without nested "
                       "virtualization, or an x86_64 Python under Rosetta)"), notes  # fmt: skip
    return False, f"hv_vm_create failed: {h.return_text(rc)} (sysctl kern.hv_support says whether the CPU has VMX)", notes


def create_vm(vcpu_count: int = 1, *, irqchip=None, **options) -> HvfVm:
    return HvfVm(vcpu_count, irqchip=irqchip)


class HvfVm(HypervisorVm):
    name = "hvf"
    title = TITLE
    arch = ARCH
    capabilities = frozenset({Capability.USERSPACE_IRQCHIP, Capability.SERVE_IO_DIRECTLY, Capability.READONLY_MEMORY,
                              Capability.GUEST_DEBUG, Capability.INSTRUCTION_BREAKPOINTS})  # fmt: skip

    def __init__(self, vcpu_count: int = 1, *, irqchip=None):
        self.lib = _load()
        self.vcpus = {}
        self._exports: dict[int, tuple[object, int, int]] = {}
        rc = self.lib.hv_vm_create(h.HV_VM_DEFAULT) & 0xFFFFFFFF
        if rc == h.HV_DENIED:
            raise AccelError("hvf", f"hv_vm_create: HV_DENIED; {_SIGN_HELP}")
        _check(rc, "hv_vm_create")
        self._open = True
        value = h.intel.new("uint64_t *")
        self.max_vcpus = int(value[0]) if not self.lib.hv_capability(HV_CAP_VCPUMAX, value) else 64
        self.max_vcpus = min(self.max_vcpus, 254)
        if not 1 <= vcpu_count <= self.max_vcpus:
            self.close()
            raise AccelError("hvf", f"vcpu_count {vcpu_count} is outside 1..{self.max_vcpus}")
        self._init_platform(vcpu_count, irqchip)
        self.irqchip.on_wake(self._wake)
        caps = {}
        for name, field in (("pin", h.HV_VMX_CAP_PINBASED), ("cpu", h.HV_VMX_CAP_PROCBASED),
                            ("cpu2", h.HV_VMX_CAP_PROCBASED2), ("entry", h.HV_VMX_CAP_ENTRY), ("exit", h.HV_VMX_CAP_EXIT)):
            _check(self.lib.hv_vmx_read_capability(field, value), f"hv_vmx_read_capability({name})")
            caps[name] = int(value[0])
        self.vmx_caps = caps

    def map_memory(self, slot: int, guest_addr: int, host_buffer, *, readonly: bool = False) -> None:
        size = len(host_buffer)
        if not page_aligned(guest_addr, size):
            raise AccelError("hvf", f"memory slot {slot}: {guest_addr:#x}+{size:#x} is not page-aligned")
        if slot in self.slots:
            raise AccelError("hvf", f"memory slot {slot} is already mapped")
        try:
            export = h.intel.from_buffer(host_buffer, require_writable=True)
        except TypeError as err:
            raise AccelError("hvf", f"memory slot {slot}: host buffer must be a writable mmap ({err})") from err
        flags = h.HV_MEMORY_READ | h.HV_MEMORY_EXEC | (0 if readonly else h.HV_MEMORY_WRITE)
        _check(self.lib.hv_vm_map(export, guest_addr, size, flags), f"hv_vm_map(slot {slot}, {guest_addr:#x}+{size:#x})")
        self.slots[slot] = (guest_addr, host_buffer)
        self._exports[slot] = (export, guest_addr, size)

    def unmap_memory(self, slot: int) -> None:
        export, guest_addr, size = self._exports.pop(slot)
        self.slots.pop(slot)
        _check(self.lib.hv_vm_unmap(guest_addr, size), f"hv_vm_unmap(slot {slot})")
        h.intel.release(export)

    def close(self) -> None:
        self._close_vcpus()
        if not getattr(self, "_open", False):
            return
        for slot in list(self._exports):
            self.unmap_memory(slot)
        self.lib.hv_vm_destroy()
        self._open = False


class _OwnerThread:
    """The thread a Hypervisor.framework vCPU belongs to: it runs every call made on the vCPU."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait()

    def _main(self) -> None:
        self.ident = threading.get_ident()
        self._started.set()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, box, done = job
            try:
                box.append((True, fn(*args)))
            except BaseException as err:  # handed back to the caller's thread
                box.append((False, err))
            done.set()

    def call(self, fn, *args):
        if threading.get_ident() == self.ident:
            return fn(*args)
        box, done = [], threading.Event()
        self._jobs.put((fn, args, box, done))
        done.wait()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(2)


def _owned(name: str):
    raw = getattr(HypervisorVcpu, name, None)

    def method(self, *args):
        return self._owner.call(getattr(self, "_" + name), *args)

    method.__name__ = name
    method.__doc__ = getattr(raw, "__doc__", None)
    return method


class HvfVcpu(HypervisorVcpu):
    backend = "hvf"

    def __init__(self, vm: HvfVm, index: int):
        super().__init__(vm, index)
        self.lib = vm.lib
        self._vmcs_value = h.intel.new("uint64_t *")
        self._pending_in = None  # (data, size, next rip) of an IN returned to the VMM
        self._owner = _OwnerThread(f"hvf-vcpu{index}")
        self._id = self._owner.call(self._create)

    # ------------------------------------------------------------------ set-up (owner thread)
    def _create(self) -> int:
        lib, caps = self.lib, self._vm.vmx_caps
        ident = h.intel.new("hv_vcpuid_t *")
        _check(lib.hv_vcpu_create(ident, h.HV_VCPU_DEFAULT), f"hv_vcpu_create (vCPU {self.index})")
        self._id = ident[0]
        self._controls = {
            h.VMCS_CTRL_PIN_BASED: vmx.constrain_controls(caps["pin"], h.PIN_BASED_INTR | h.PIN_BASED_NMI
                                                          | h.PIN_BASED_VIRTUAL_NMI),
            h.VMCS_CTRL_CPU_BASED: vmx.constrain_controls(caps["cpu"], h.CPU_BASED_HLT | h.CPU_BASED_UNCOND_IO
                                                          | h.CPU_BASED_SECONDARY_CTLS),
            h.VMCS_CTRL_CPU_BASED2: vmx.constrain_controls(caps["cpu2"], h.CPU_BASED2_EPT | h.CPU_BASED2_UNRESTRICTED
                                                           | h.CPU_BASED2_RDTSCP),
            h.VMCS_CTRL_VMENTRY_CONTROLS: vmx.constrain_controls(caps["entry"], h.VMENTRY_LOAD_EFER),
            h.VMCS_CTRL_VMEXIT_CONTROLS: vmx.constrain_controls(caps["exit"], h.VMEXIT_HOST_IA32E | h.VMEXIT_SAVE_EFER
                                                                | h.VMEXIT_LOAD_EFER),
        }  # fmt: skip
        self._entry_allowed = caps["entry"]
        for field, value in self._controls.items():
            self._wvmcs(field, value)
        self._wvmcs(h.VMCS_CTRL_EXC_BITMAP, 0)
        self._wvmcs(h.VMCS_CTRL_CR0_MASK, CR0_HOST_OWNED)
        self._wvmcs(h.VMCS_CTRL_CR4_MASK, CR4_HOST_OWNED)
        for msr in NATIVE_MSRS:
            _check(lib.hv_vcpu_enable_native_msr(self._id, msr, True), f"hv_vcpu_enable_native_msr({msr:#x})")
        self._window_requested = False
        return self._id

    # ------------------------------------------------------------------ VMCS and registers
    def _rvmcs(self, field: int) -> int:
        rc = self.lib.hv_vmx_vcpu_read_vmcs(self._id, field, self._vmcs_value)
        if rc & 0xFFFFFFFF:
            raise AccelError("hvf", f"hv_vmx_vcpu_read_vmcs({field:#x}) failed: {h.return_text(rc)}")
        return int(self._vmcs_value[0])

    def _wvmcs(self, field: int, value: int) -> None:
        rc = self.lib.hv_vmx_vcpu_write_vmcs(self._id, field, value & 0xFFFFFFFFFFFFFFFF)
        if rc & 0xFFFFFFFF:
            raise AccelError("hvf", f"hv_vmx_vcpu_write_vmcs({field:#x}, {value:#x}) failed: {h.return_text(rc)}")

    def _rreg(self, name: str) -> int:
        rc = self.lib.hv_vcpu_read_register(self._id, h.HV_X86[name], self._vmcs_value)
        if rc & 0xFFFFFFFF:
            raise AccelError("hvf", f"hv_vcpu_read_register({name}) failed: {h.return_text(rc)}")
        return int(self._vmcs_value[0])

    def _wreg(self, name: str, value: int) -> None:
        _check(self.lib.hv_vcpu_write_register(self._id, h.HV_X86[name], value & 0xFFFFFFFFFFFFFFFF),
               f"hv_vcpu_write_register({name})")  # fmt: skip

    def _get_regs(self) -> Regs:
        regs = Regs(*(self._rreg(name.upper()) for name in _REG_FIELDS))
        regs.rflags = self._guest_rflags(regs.rflags)
        return regs

    def _set_regs(self, regs: Regs) -> None:
        for name in _REG_FIELDS:
            value = getattr(regs, name)
            self._wreg(name.upper(), self._hardware_rflags(value) if name == "rflags" else value)

    def _guest_cr(self, field: int, mask_field: int, shadow_field: int) -> int:
        mask = self._rvmcs(mask_field)
        return (self._rvmcs(field) & ~mask) | (self._rvmcs(shadow_field) & mask)

    def _get_sregs(self) -> SpecialRegs:
        segments = {}
        for name, (sel, limit, ar, base) in h.VMCS_GUEST_SEGMENTS.items():
            segments[name] = vmx.access_rights_to_segment(self._rvmcs(sel), self._rvmcs(base), self._rvmcs(limit),
                                                          self._rvmcs(ar))  # fmt: skip
        return SpecialRegs(
            **segments,
            gdt=DescriptorTable(self._rvmcs(h.VMCS_GUEST_GDTR_BASE), self._rvmcs(h.VMCS_GUEST_GDTR_LIMIT)),
            idt=DescriptorTable(self._rvmcs(h.VMCS_GUEST_IDTR_BASE), self._rvmcs(h.VMCS_GUEST_IDTR_LIMIT)),
            cr0=self._guest_cr(h.VMCS_GUEST_CR0, h.VMCS_CTRL_CR0_MASK, h.VMCS_CTRL_CR0_SHADOW),
            cr2=self._rreg("CR2"), cr3=self._rvmcs(h.VMCS_GUEST_CR3),
            cr4=self._guest_cr(h.VMCS_GUEST_CR4, h.VMCS_CTRL_CR4_MASK, h.VMCS_CTRL_CR4_SHADOW),
            cr8=self._rreg("TPR") >> 4, efer=self._rvmcs(h.VMCS_GUEST_IA32_EFER),
            apic_base=self._chip.get_apic_base(self.index),
        )  # fmt: skip

    def _set_sregs(self, sregs: SpecialRegs) -> None:
        for name, (sel, limit, ar, base) in h.VMCS_GUEST_SEGMENTS.items():
            seg = getattr(sregs, name)
            self._wvmcs(sel, seg.selector)
            self._wvmcs(base, seg.base)
            self._wvmcs(limit, seg.limit)
            self._wvmcs(ar, vmx.segment_to_access_rights(seg))
        self._wvmcs(h.VMCS_GUEST_GDTR_BASE, sregs.gdt.base)
        self._wvmcs(h.VMCS_GUEST_GDTR_LIMIT, sregs.gdt.limit)
        self._wvmcs(h.VMCS_GUEST_IDTR_BASE, sregs.idt.base)
        self._wvmcs(h.VMCS_GUEST_IDTR_LIMIT, sregs.idt.limit)
        self._wreg("CR2", sregs.cr2)
        self._wvmcs(h.VMCS_GUEST_CR3, sregs.cr3)
        self._write_cr0(sregs.cr0)
        self._write_cr4(sregs.cr4)
        self._wreg("TPR", (sregs.cr8 & 0xF) << 4)
        self._write_efer(sregs.efer)
        if sregs.apic_base and sregs.apic_base != self._chip.get_apic_base(self.index):
            self._chip.set_apic_base(self.index, sregs.apic_base)

    def _write_cr0(self, value: int) -> None:
        self._wvmcs(h.VMCS_CTRL_CR0_SHADOW, value)
        self._wvmcs(h.VMCS_GUEST_CR0, value | CR0_NE)

    def _write_cr4(self, value: int) -> None:
        self._wvmcs(h.VMCS_CTRL_CR4_SHADOW, value)
        self._wvmcs(h.VMCS_GUEST_CR4, value | CR4_VMXE)

    def _write_efer(self, efer: int) -> None:
        """EFER, and the IA-32e-mode-guest entry control that must match EFER.LMA (SDM 26.3.1.1)."""
        self._wvmcs(h.VMCS_GUEST_IA32_EFER, efer)
        entry = self._rvmcs(h.VMCS_CTRL_VMENTRY_CONTROLS)
        entry = (entry | h.VMENTRY_GUEST_IA32E) if efer & EFER_LMA else (entry & ~h.VMENTRY_GUEST_IA32E)
        self._wvmcs(h.VMCS_CTRL_VMENTRY_CONTROLS, entry)

    def _mov_to_cr0(self, value: int) -> None:
        """A guest write of CR0 that changed a host-owned bit: activate or leave long mode as the CPU would."""
        efer = self._rvmcs(h.VMCS_GUEST_IA32_EFER)
        if value & CR0_PG and efer & EFER_LME:
            efer |= EFER_LMA
        elif not value & CR0_PG:
            efer &= ~EFER_LMA
        self._write_cr0(value)
        self._write_efer(efer)

    def _get_fpu(self) -> FpuState:
        return fpu_from_fxsave(self._fpstate())

    def _fpstate(self) -> bytes:
        area = h.intel.new("char[]", FPSTATE_SIZE)
        _check(self.lib.hv_vcpu_read_fpstate(self._id, area, FPSTATE_SIZE), "hv_vcpu_read_fpstate")
        return bytes(h.intel.buffer(area))

    def _set_fpu(self, fpu: FpuState) -> None:
        merged = fpu_into_xsave(self._fpstate(), fpu)
        area = h.intel.new("char[]", merged)
        _check(self.lib.hv_vcpu_write_fpstate(self._id, area, FPSTATE_SIZE), "hv_vcpu_write_fpstate")

    def _get_xcr0(self) -> int:
        return self._rreg("XCR0")

    def _set_xcr0(self, value: int) -> None:
        self._wreg("XCR0", value)

    def _get_msrs(self, indices: list[int]) -> dict[int, int]:
        out = {}
        for msr in indices:
            if msr == m.MSR_IA32_APIC_BASE:
                out[msr] = self._chip.get_apic_base(self.index)
            elif msr == m.MSR_EFER:
                out[msr] = self._rvmcs(h.VMCS_GUEST_IA32_EFER)
            elif msr == m.MSR_IA32_CR_PAT:
                out[msr] = self._rvmcs(h.VMCS_GUEST_IA32_PAT)
            elif msr in NATIVE_MSRS:
                _check(self.lib.hv_vcpu_read_msr(self._id, msr, self._vmcs_value), f"hv_vcpu_read_msr({msr:#x})")
                out[msr] = int(self._vmcs_value[0])
            else:
                out[msr] = self._msr_shadow.get(msr, 0)
        return out

    def _set_msrs(self, msrs: dict[int, int]) -> None:
        for msr, value in msrs.items():
            value &= 0xFFFFFFFFFFFFFFFF
            if msr == m.MSR_IA32_APIC_BASE:
                self._chip.set_apic_base(self.index, value)
            elif msr == m.MSR_EFER:
                self._write_efer(value)
            elif msr == m.MSR_IA32_CR_PAT:
                self._wvmcs(h.VMCS_GUEST_IA32_PAT, value)
            elif msr in NATIVE_MSRS:
                _check(self.lib.hv_vcpu_write_msr(self._id, msr, value), f"hv_vcpu_write_msr({msr:#x})")
            else:
                self._msr_shadow[msr] = value  # RDMSR exits answer from here

    def _get_events(self) -> PendingEvents:
        info = vmx.decode_interruption(self._rvmcs(h.VMCS_CTRL_VMENTRY_IRQ_INFO))
        state = self._rvmcs(h.VMCS_GUEST_INTERRUPTIBILITY)
        events = PendingEvents(
            shadow=(SHADOW_STI if state & h.GUEST_INTRBILITY_STI_BLOCKING else 0)
            | (SHADOW_MOV_SS if state & h.GUEST_INTRBILITY_MOVSS_BLOCKING else 0),
            nmi_masked=bool(state & h.GUEST_INTRBILITY_NMI_BLOCKING),
        )
        if info is not None:
            if info.type == vmx.INFO_TYPE_NMI:
                events.nmi_injected = True
            elif info.type in (vmx.INFO_TYPE_EXTERNAL, vmx.INFO_TYPE_SOFTWARE_INTERRUPT):
                events.interrupt, events.interrupt_soft = info.vector, info.type == vmx.INFO_TYPE_SOFTWARE_INTERRUPT
            else:
                events.exception = info.vector
                if info.error_valid:
                    events.exception_error_code = self._rvmcs(h.VMCS_CTRL_VMENTRY_EXC_ERROR)
        return events

    def _set_events(self, events: PendingEvents) -> None:
        state = self._rvmcs(h.VMCS_GUEST_INTERRUPTIBILITY) & ~(
            h.GUEST_INTRBILITY_STI_BLOCKING | h.GUEST_INTRBILITY_MOVSS_BLOCKING | h.GUEST_INTRBILITY_NMI_BLOCKING)
        if events.shadow & SHADOW_STI:
            state |= h.GUEST_INTRBILITY_STI_BLOCKING
        if events.shadow & SHADOW_MOV_SS:
            state |= h.GUEST_INTRBILITY_MOVSS_BLOCKING
        if events.nmi_masked:
            state |= h.GUEST_INTRBILITY_NMI_BLOCKING
        self._wvmcs(h.VMCS_GUEST_INTERRUPTIBILITY, state)
        info = 0
        if events.exception is not None:
            kind = vmx.INFO_TYPE_HARDWARE_EXCEPTION
            info = vmx.interruption_info(events.exception, kind, error_code=events.exception_error_code is not None)
            if events.exception_error_code is not None:
                self._wvmcs(h.VMCS_CTRL_VMENTRY_EXC_ERROR, events.exception_error_code)
        elif events.nmi_injected:
            info = vmx.interruption_info(2, vmx.INFO_TYPE_NMI)
        elif events.interrupt is not None:
            info = vmx.interruption_info(events.interrupt, vmx.INFO_TYPE_SOFTWARE_INTERRUPT if events.interrupt_soft
                                         else vmx.INFO_TYPE_EXTERNAL)  # fmt: skip
        self._wvmcs(h.VMCS_CTRL_VMENTRY_IRQ_INFO, info)

    # ------------------------------------------------------------------ guest debugging (hvcore's hooks)
    _set_guest_debug = HypervisorVcpu.set_guest_debug

    def _apply_guest_debug(self, debug: GuestDebug) -> None:
        """Intercept #DB while stepping or with the debugger's debug registers, #BP with its int3s."""
        bitmap = (1 << DB if debug.single_step or debug.dr7 & DR7_ENABLE else 0)
        bitmap |= 1 << BP if debug.software_breakpoints else 0
        self._wvmcs(h.VMCS_CTRL_EXC_BITMAP, bitmap)

    def _read_rflags(self) -> int:
        return self._rreg("RFLAGS")

    def _write_rflags(self, value: int) -> None:
        self._wreg("RFLAGS", value)

    def _read_rip(self) -> int:
        return self._rreg("RIP")

    def _cs_base(self) -> int:
        return self._rvmcs(h.VMCS_GUEST_SEGMENTS["cs"][3])

    def _read_drs(self) -> tuple[tuple[int, int, int, int], int]:
        return tuple(self._rreg(f"DR{i}") for i in range(4)), self._rvmcs(h.VMCS_GUEST_DR7)

    def _write_drs(self, addresses, dr7: int) -> None:
        for i, address in enumerate(addresses):
            self._wreg(f"DR{i}", address)
        self._wvmcs(h.VMCS_GUEST_DR7, dr7)

    def _reinject(self, vector: int, length: int, dr6: int) -> None:
        if vector == BP:  # as INT3 raised it: a software exception, the return RIP past the instruction
            self._wvmcs(h.VMCS_CTRL_VMENTRY_IRQ_INFO, vmx.interruption_info(BP, vmx.INFO_TYPE_SOFTWARE_EXCEPTION))
            self._wvmcs(h.VMCS_CTRL_VMENTRY_INSTR_LEN, length)
        else:  # the exit left DR6 alone (SDM 27.1): the guest's handler reads the bits there
            self._wreg("DR6", 0xFFFF0FF0 | dr6)
            self._wvmcs(h.VMCS_CTRL_VMENTRY_IRQ_INFO, vmx.interruption_info(DB, vmx.INFO_TYPE_HARDWARE_EXCEPTION))

    # ------------------------------------------------------------------ interrupts (hvcore's hooks)
    def _interrupts_enabled(self) -> bool:
        return bool(self._rreg("RFLAGS") & RFLAGS_IF)

    def _window_open(self) -> bool:
        if not self._interrupts_enabled():
            return False
        if self._rvmcs(h.VMCS_GUEST_INTERRUPTIBILITY) & (h.GUEST_INTRBILITY_STI_BLOCKING | h.GUEST_INTRBILITY_MOVSS_BLOCKING):
            return False
        return not self._rvmcs(h.VMCS_CTRL_VMENTRY_IRQ_INFO) & vmx.INFO_VALID

    def _inject(self, vector: int) -> None:
        self._wvmcs(h.VMCS_CTRL_VMENTRY_IRQ_INFO, vmx.interruption_info(vector, vmx.INFO_TYPE_EXTERNAL))

    def _inject_nmi(self) -> None:
        self._wvmcs(h.VMCS_CTRL_VMENTRY_IRQ_INFO, vmx.interruption_info(2, vmx.INFO_TYPE_NMI))

    def _request_window(self, on: bool) -> None:
        if on == self._window_requested:
            return
        controls = self._controls[h.VMCS_CTRL_CPU_BASED]
        controls = (controls | h.CPU_BASED_IRQ_WND) if on else (controls & ~h.CPU_BASED_IRQ_WND)
        self._controls[h.VMCS_CTRL_CPU_BASED] = controls
        self._wvmcs(h.VMCS_CTRL_CPU_BASED, controls)
        self._window_requested = on

    def _hv_kick(self) -> None:
        ident = h.intel.new("hv_vcpuid_t[1]", [self._id])
        self.lib.hv_vcpu_interrupt(ident, 1)

    # ------------------------------------------------------------------ running (owner thread)
    def _run(self):
        return HypervisorVcpu.run(self)

    def _complete_pending(self) -> None:
        pending, self._pending_in = self._pending_in, None
        if pending is not None:
            data, size, next_rip = pending
            self._set_rax_in(int.from_bytes(data, "little"), size)
            self._wreg("RIP", next_rip)

    def _set_rax_in(self, value: int, size: int) -> None:
        if size == 4:
            self._wreg("RAX", value)  # a 32-bit destination zero-extends into RAX
        else:
            mask = (1 << (8 * size)) - 1
            self._wreg("RAX", (self._rreg("RAX") & ~mask) | (value & mask))

    def _advance(self) -> None:
        self._wreg("RIP", self._rreg("RIP") + self._rvmcs(h.VMCS_RO_VMEXIT_INSTR_LEN))

    def _run_once(self):
        if not self._enter_run():
            return None
        try:
            rc = self.lib.hv_vcpu_run_until(self._id, h.HV_DEADLINE_FOREVER)
        finally:
            self._left_run()
        if rc & 0xFFFFFFFF:
            return InternalError("hv_vcpu_run_until failed", h.return_text(rc), self._safe_rip())
        reason = self._rvmcs(h.VMCS_RO_EXIT_REASON)
        if reason & (1 << 31):
            return InternalError("VM entry failed", f"exit reason {reason & 0xFFFF} with the entry-failure bit: "
                                 "Hypervisor.framework refused the guest state", self._safe_rip())  # fmt: skip
        self._reinject_vectoring()
        reason &= 0xFFFF
        # these exits come instead of their instruction, which the VMM completes (a step ends there)
        self._completed = reason in _COMPLETED_BY_VMM
        return self._dispatch(reason)

    def _reinject_vectoring(self) -> None:
        """An event whose delivery the exit interrupted is injected again at the next entry (SDM 27.2.4)."""
        info = self._rvmcs(h.VMCS_RO_IDT_VECTOR_INFO)
        if not info & vmx.INFO_VALID:
            return
        self._wvmcs(h.VMCS_CTRL_VMENTRY_IRQ_INFO, info & ~(1 << 12))
        if info & vmx.INFO_ERROR_VALID:
            self._wvmcs(h.VMCS_CTRL_VMENTRY_EXC_ERROR, self._rvmcs(h.VMCS_RO_IDT_VECTOR_ERROR))
        self._wvmcs(h.VMCS_CTRL_VMENTRY_INSTR_LEN, self._rvmcs(h.VMCS_RO_VMEXIT_INSTR_LEN))

    def _dispatch(self, reason: int):
        if reason == h.VMX_REASON_IO:
            return self._io_exit(self._rvmcs(h.VMCS_RO_EXIT_QUALIFIC))
        if reason == h.VMX_REASON_EPT_VIOLATION:
            qualification = self._rvmcs(h.VMCS_RO_EXIT_QUALIFIC)
            gpa = self._rvmcs(h.VMCS_GUEST_PHYSICAL_ADDRESS)
            if self._vm.in_ram(gpa):
                kind = "write to read-only" if vmx.ept_violation_is_write(qualification) else "access to"
                return InternalError("EPT violation", f"{kind} guest RAM at {gpa:#x} "
                                     f"(qualification {qualification:#x})", self._safe_rip())  # fmt: skip
            self._emulate(self._rreg("RIP"))  # MMIO: VMX does not decode the instruction
            return None
        if reason in (h.VMX_REASON_IRQ, h.VMX_REASON_VMX_TIMER_EXPIRED):
            return None  # a kick, or a host interrupt: the loop looks at stops, timers and interrupts
        if reason == h.VMX_REASON_IRQ_WND:
            self._request_window(False)
            return None
        if reason == h.VMX_REASON_HLT:
            self._advance()
            if not self._rvmcs(h.VMCS_CTRL_VMENTRY_IRQ_INFO) & vmx.INFO_VALID:
                self._halted = True  # an event still to be injected (handed back) wakes the HLT at once
            return None
        if reason == h.VMX_REASON_CPUID:
            regs = self._get_regs()
            cr4 = self._guest_cr(h.VMCS_GUEST_CR4, h.VMCS_CTRL_CR4_MASK, h.VMCS_CTRL_CR4_SHADOW)
            for name, value in zip(("RAX", "RBX", "RCX", "RDX"), self.cpuid_answer(regs.rax, regs.rcx, cr4)):
                self._wreg(name, value)
            self._advance()
            return None
        if reason in (h.VMX_REASON_RDMSR, h.VMX_REASON_WRMSR):
            msr = self._rreg("RCX") & 0xFFFFFFFF
            if reason == h.VMX_REASON_RDMSR:
                value = self._get_msrs([msr])[msr]
                self._wreg("RAX", value & 0xFFFFFFFF)
                self._wreg("RDX", value >> 32)
            else:
                self._set_msrs({msr: (self._rreg("RDX") & 0xFFFFFFFF) << 32 | (self._rreg("RAX") & 0xFFFFFFFF)})
            self._advance()
            return None
        if reason == h.VMX_REASON_XSETBV:
            if self._rreg("RCX") & 0xFFFFFFFF:
                return InternalError("XSETBV", "only XCR0 exists", self._safe_rip())
            self._wreg("XCR0", (self._rreg("RDX") & 0xFFFFFFFF) << 32 | (self._rreg("RAX") & 0xFFFFFFFF))
            self._advance()
            return None
        if reason == h.VMX_REASON_MOV_CR:
            return self._mov_cr_exit(self._rvmcs(h.VMCS_RO_EXIT_QUALIFIC))
        if reason == h.VMX_REASON_TRIPLE_FAULT:
            return Shutdown("triple fault")
        if reason == h.VMX_REASON_EXC_NMI:
            info = vmx.decode_interruption(self._rvmcs(h.VMCS_RO_VMEXIT_IRQ_INFO))
            if info is not None and info.type == vmx.INFO_TYPE_NMI:
                return None  # a host NMI
            if info is not None and info.vector in (DB, BP):  # the exception bitmap's (set_guest_debug)
                # a #DB's qualification has DR6's B0-B3 and BS bits (SDM Table 27-1)
                dr6 = self._rvmcs(h.VMCS_RO_EXIT_QUALIFIC) & 0x400F if info.vector == DB else 0
                length = self._rvmcs(h.VMCS_RO_VMEXIT_INSTR_LEN)
                return self._debug_exception(info.vector, self._rreg("RIP"), length=length, dr6=dr6)
            return InternalError("unexpected exception exit", f"interruption info {info}", self._safe_rip())
        return InternalError("unhandled VMX exit", f"exit reason {reason}", self._safe_rip())

    def _io_exit(self, qualification: int):
        io = vmx.decode_io(qualification)
        if io.string:  # the qualification has no address: the stepper executes it (one element per exit)
            self._emulate(self._rreg("RIP"))
            return None
        next_rip = self._rreg("RIP") + self._rvmcs(h.VMCS_RO_VMEXIT_INSTR_LEN)
        if io.is_in:
            data = bytearray(io.size)
            exit_value = self._port_io(io.port, memoryview(data), True)
            if exit_value is not None:
                self._pending_in = (data, io.size, next_rip)
                return exit_value
            self._set_rax_in(int.from_bytes(data, "little"), io.size)
        else:
            value = self._rreg("RAX") & ((1 << (8 * io.size)) - 1)
            exit_value = self._port_io(io.port, value.to_bytes(io.size, "little"), False)
            if exit_value is not None:
                self._wreg("RIP", next_rip)
                return exit_value
        self._wreg("RIP", next_rip)
        return None

    def _mov_cr_exit(self, qualification: int):
        cr, access, gpr = qualification & 0xF, (qualification >> 4) & 3, (qualification >> 8) & 0xF
        if access != 0 or cr not in (0, 4):  # only MOV to CR0/CR4 touch host-owned bits
            return InternalError("unhandled CR access", f"qualification {qualification:#x}", self._safe_rip())
        value = getattr(self._get_regs(), _GPR_ORDER[gpr])
        if cr == 0:
            self._mov_to_cr0(value)
        else:
            self._write_cr4(value)
        self._advance()
        return None

    def _safe_rip(self) -> int | None:
        try:
            return self._rreg("RIP")
        except AccelError:
            return None

    def _close(self) -> None:
        self.lib.hv_vcpu_destroy(self._id)

    def close(self) -> None:
        if self._closing:
            return
        self._stop_threads()
        self._owner.call(self._close)
        self._owner.stop()


for _name in ("run", "get_regs", "set_regs", "get_sregs", "set_sregs", "get_fpu", "set_fpu", "get_xcr0", "set_xcr0",
              "get_msrs", "set_msrs", "get_events", "set_events", "save_state", "restore_state", "set_guest_debug"):
    setattr(HvfVcpu, _name, _owned(_name))
del _name


HvfVm.vcpu_class = HvfVcpu  # defined after the VM class that makes it
