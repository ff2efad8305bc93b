"""ffi/kvm.py against the C headers: struct sizes, field offsets, ioctl numbers, constants.

A tiny C probe is compiled against <linux/kvm.h> and prints each value; every
value is compared with the cffi declaration one by one. Skipped (with the
reason) when gcc or the kernel headers (Debian: linux-libc-dev) are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from pyvmm.ffi import kvm

STRUCTS = [
    "kvm_run", "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_fpu", "kvm_msr_entry", "kvm_msrs",
    "kvm_msr_list", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_lapic_state", "kvm_userspace_memory_region",
    "kvm_dirty_log",
    "kvm_irq_level", "kvm_pit_config", "kvm_irqfd", "kvm_ioeventfd", "kvm_enable_cap", "kvm_vcpu_events",
    "kvm_mp_state", "kvm_xsave", "kvm_xcr", "kvm_xcrs", "kvm_guest_debug", "kvm_debug_exit_arch", "kvm_msi",
    "kvm_irq_routing", "kvm_irq_routing_entry", "kvm_irqchip", "kvm_pit_channel_state", "kvm_pit_state2", "kvm_clock_data",
]

# (struct, C member path, cffi member path)
OFFSETS = [
    ("kvm_run", "request_interrupt_window", "request_interrupt_window"),
    ("kvm_run", "immediate_exit", "immediate_exit"),
    ("kvm_run", "exit_reason", "exit_reason"),
    ("kvm_run", "ready_for_interrupt_injection", "ready_for_interrupt_injection"),
    ("kvm_run", "if_flag", "if_flag"),
    ("kvm_run", "flags", "flags"),
    ("kvm_run", "cr8", "cr8"),
    ("kvm_run", "apic_base", "apic_base"),
    ("kvm_run", "hw.hardware_exit_reason", "hw.hardware_exit_reason"),
    ("kvm_run", "fail_entry.hardware_entry_failure_reason", "fail_entry.hardware_entry_failure_reason"),
    ("kvm_run", "fail_entry.cpu", "fail_entry.cpu"),
    ("kvm_run", "ex.exception", "ex.exception"),
    ("kvm_run", "ex.error_code", "ex.error_code"),
    ("kvm_run", "io.direction", "io.direction"),
    ("kvm_run", "io.size", "io.size"),
    ("kvm_run", "io.port", "io.port"),
    ("kvm_run", "io.count", "io.count"),
    ("kvm_run", "io.data_offset", "io.data_offset"),
    ("kvm_run", "debug.arch.pc", "debug.arch.pc"),
    ("kvm_run", "debug.arch.dr7", "debug.arch.dr7"),
    ("kvm_run", "mmio.phys_addr", "mmio.phys_addr"),
    ("kvm_run", "mmio.data", "mmio.data"),
    ("kvm_run", "mmio.len", "mmio.len"),
    ("kvm_run", "mmio.is_write", "mmio.is_write"),
    ("kvm_run", "hypercall.nr", "hypercall.nr"),
    ("kvm_run", "hypercall.ret", "hypercall.ret"),
    ("kvm_run", "hypercall.longmode", "hypercall.longmode"),
    ("kvm_run", "internal.suberror", "internal.suberror"),
    ("kvm_run", "internal.ndata", "internal.ndata"),
    ("kvm_run", "internal.data", "internal.data"),
    ("kvm_run", "emulation_failure.suberror", "emulation_failure.suberror"),
    ("kvm_run", "emulation_failure.ndata", "emulation_failure.ndata"),
    ("kvm_run", "emulation_failure.flags", "emulation_failure.flags"),
    ("kvm_run", "emulation_failure.insn_size", "emulation_failure.insn_size"),
    ("kvm_run", "emulation_failure.insn_bytes", "emulation_failure.insn_bytes"),
    ("kvm_run", "system_event.type", "system_event.type"),
    ("kvm_run", "system_event.ndata", "system_event.ndata"),
    ("kvm_run", "system_event.flags", "system_event.flags"),
    ("kvm_run", "system_event.data", "system_event.data"),
    ("kvm_run", "kvm_valid_regs", "kvm_valid_regs"),
    ("kvm_run", "kvm_dirty_regs", "kvm_dirty_regs"),
    ("kvm_run", "s", "s"),
    ("kvm_regs", "rip", "rip"),
    ("kvm_regs", "rflags", "rflags"),
    ("kvm_segment", "selector", "selector"),
    ("kvm_segment", "type", "type"),
    ("kvm_segment", "unusable", "unusable"),
    ("kvm_sregs", "tr", "tr"),
    ("kvm_sregs", "gdt", "gdt"),
    ("kvm_sregs", "idt", "idt"),
    ("kvm_sregs", "cr0", "cr0"),
    ("kvm_sregs", "efer", "efer"),
    ("kvm_sregs", "apic_base", "apic_base"),
    ("kvm_sregs", "interrupt_bitmap", "interrupt_bitmap"),
    ("kvm_fpu", "fcw", "fcw"),
    ("kvm_fpu", "ftwx", "ftwx"),
    ("kvm_fpu", "last_opcode", "last_opcode"),
    ("kvm_fpu", "last_ip", "last_ip"),
    ("kvm_fpu", "xmm", "xmm"),
    ("kvm_fpu", "mxcsr", "mxcsr"),
    ("kvm_msrs", "entries", "entries"),
    ("kvm_cpuid_entry2", "eax", "eax"),
    ("kvm_cpuid_entry2", "edx", "edx"),
    ("kvm_cpuid2", "entries", "entries"),
    ("kvm_userspace_memory_region", "guest_phys_addr", "guest_phys_addr"),
    ("kvm_userspace_memory_region", "userspace_addr", "userspace_addr"),
    ("kvm_dirty_log", "dirty_bitmap", "dirty_bitmap"),
    ("kvm_irq_level", "level", "level"),
    ("kvm_irqfd", "resamplefd", "resamplefd"),
    ("kvm_ioeventfd", "len", "len"),
    ("kvm_ioeventfd", "fd", "fd"),
    ("kvm_ioeventfd", "flags", "flags"),
    ("kvm_enable_cap", "args", "args"),
    ("kvm_vcpu_events", "interrupt", "interrupt"),
    ("kvm_vcpu_events", "nmi", "nmi"),
    ("kvm_vcpu_events", "sipi_vector", "sipi_vector"),
    ("kvm_vcpu_events", "flags", "flags"),
    ("kvm_vcpu_events", "smi", "smi"),
    ("kvm_vcpu_events", "triple_fault", "triple_fault"),
    ("kvm_vcpu_events", "exception_has_payload", "exception_has_payload"),
    ("kvm_vcpu_events", "exception_payload", "exception_payload"),
    ("kvm_xcrs", "xcrs", "xcrs"),
    ("kvm_xcrs", "padding", "padding"),
    ("kvm_guest_debug", "arch", "arch"),
    ("kvm_msi", "devid", "devid"),
    ("kvm_irq_routing_entry", "u", "u"),
    ("kvm_irq_routing_entry", "u.msi.devid", "u.msi.devid"),
    ("kvm_irq_routing", "entries", "entries"),
]

IOCTLS = sorted(name for name in dir(kvm) if name.startswith("KVM_") and name[4:].startswith((
    "GET_", "SET_", "CREATE_", "CHECK_", "RUN", "IRQ_LINE", "IRQFD", "IOEVENTFD", "ENABLE_CAP", "SIGNAL_MSI",
    "KVMCLOCK_CTRL")))

CONSTANT_PREFIXES = ("KVM_EXIT_", "KVM_CAP_", "KVM_INTERNAL_ERROR_", "KVM_SYSTEM_EVENT_", "KVM_MEM_", "KVM_PIT_",
                     "KVM_IRQFD_FLAG_", "KVM_IOEVENTFD_FLAG_", "KVM_IRQ_ROUTING_", "KVM_IRQCHIP_", "KVM_GUESTDBG_",
                     "KVM_MP_STATE_", "KVM_VCPUEVENT_")
CONSTANTS = sorted(name for name in dir(kvm) if name.startswith(CONSTANT_PREFIXES) and name not in IOCTLS
                   and isinstance(getattr(kvm, name), int))


def _probe_source() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for struct in STRUCTS:
        lines.append(f'printf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
    for struct, c_member, _ in OFFSETS:
        lines.append(f'printf("offsetof {struct} {c_member} %zu\\n", offsetof(struct {struct}, {c_member}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'printf("value {name} %llu\\n", (unsigned long long)({name}));')
    lines.append("return 0; }")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_values(tmp_path_factory) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot compile the <linux/kvm.h> probe")
    if not os.path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("/usr/include/linux/kvm.h is missing (install linux-libc-dev)")
    work = tmp_path_factory.mktemp("kvm_probe")
    source, binary = work / "probe.c", work / "probe"
    source.write_text(_probe_source())
    build = subprocess.run(["gcc", "-o", str(binary), str(source)], capture_output=True, text=True)
    if build.returncode != 0:
        # A header older than a constant we declare: say which, do not hide it as a skip.
        pytest.fail(f"the <linux/kvm.h> probe did not compile:\n{build.stderr[-3000:]}")
    output = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in output.splitlines():
        key, _, number = line.rpartition(" ")
        values[key] = int(number)
    return values


@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_size(c_values, struct):
    assert kvm.ffi.sizeof(f"struct {struct}") == c_values[f"sizeof {struct}"]


@pytest.mark.parametrize("struct,c_member,ffi_member", OFFSETS, ids=[f"{s}.{m}" for s, m, _ in OFFSETS])
def test_field_offset(c_values, struct, c_member, ffi_member):
    assert kvm.ffi.offsetof(f"struct {struct}", *ffi_member.split(".")) == c_values[f"offsetof {struct} {c_member}"]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number(c_values, name):
    assert getattr(kvm, name) == c_values[f"value {name}"], f"{name}: {getattr(kvm, name):#x}"


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant(c_values, name):
    assert getattr(kvm, name) == c_values[f"value {name}"]


def test_kvm_run_exit_union_is_256_bytes():
    # The union is padded to 256 bytes in the ABI; kvm_valid_regs follows it.
    assert kvm.ffi.offsetof("struct kvm_run", "kvm_valid_regs") - kvm.ffi.offsetof("struct kvm_run", "io") == 256
