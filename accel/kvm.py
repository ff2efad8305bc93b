"""The KVM backend: ``VmOps``/``VcpuOps`` over the ioctls declared in ``ffi/kvm.py``.

``KvmVcpu.run()`` is the hottest path of the VMM (one call per port-I/O or MMIO
exit), so it reads ``kvm_run`` through cached cdata and memoryviews, branches
on the exit reason with plain ``if`` tests, and never logs.

Stopping a vCPU from another thread (``request_stop``) sets
``kvm_run.immediate_exit`` and, when the vCPU thread is inside ``KVM_RUN``,
interrupts it with ``KICK_SIGNAL`` (handler installed by ``install_kick_handler``).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import threading
import time
from collections import deque

from pyvmm.accel.core import (
    Capability,
    Debug,
    EmulationFailure,
    GuestDebug,
    Halt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    StateError,
    VcpuExit,
    VcpuState,
)
from pyvmm.accel.x86 import (
    ARCH,
    SAVED_MSRS,
    CpuidEntry,
    DescriptorTable,
    FpuState,
    PendingEvents,
    Regs,
    Segment,
    SpecialRegs,
    X86CpuState,
    fpu_from_fxsave,
    fpu_into_xsave,
    restorable,
)
from pyvmm.errors import AccelError
from pyvmm.ffi import kvm as k
from pyvmm.ffi.kvm import ffi, libc

DEVICE = "/dev/kvm"
TSS_ADDR = 0xFFFBD000  # three pages KVM needs for real-mode emulation on VMX, below the BIOS area
IDENTITY_MAP_ADDR = 0xFFFBC000  # one page for the EPT identity map, just below the TSS

#: the signal that kicks a vCPU thread out of KVM_RUN (a real-time one nobody else uses)
KICK_SIGNAL = signal.SIGRTMIN + 3

#: capabilities the backend cannot run without, with what each is for
REQUIRED_CAPS = {
    k.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY (guest RAM from host memory)",
    k.KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    k.KVM_CAP_EXT_CPUID: "KVM_CAP_EXT_CPUID (KVM_SET_CPUID2)",
    k.KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP (in-kernel LAPIC/IOAPIC/PIC)",
    k.KVM_CAP_PIT2: "KVM_CAP_PIT2 (in-kernel PIT)",
    k.KVM_CAP_IRQFD: "KVM_CAP_IRQFD",
    k.KVM_CAP_IOEVENTFD: "KVM_CAP_IOEVENTFD",
    k.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT (stopping vCPUs without races)",
    k.KVM_CAP_VCPU_EVENTS: "KVM_CAP_VCPU_EVENTS",
    k.KVM_CAP_MP_STATE: "KVM_CAP_MP_STATE",
    k.KVM_CAP_XSAVE: "KVM_CAP_XSAVE",
    k.KVM_CAP_XCRS: "KVM_CAP_XCRS",
}

_PVM_MODULE = "/sys/module/kvm_pvm"
_CPUID_FLAG_SIGNIFICANT_INDEX = 1
_ULONG_ZERO = ffi.cast("unsigned long", 0)

_SYSTEM_EVENTS = {
    k.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
    k.KVM_SYSTEM_EVENT_RESET: "reset",
    k.KVM_SYSTEM_EVENT_CRASH: "crash",
}
_INTERNAL_SUBERRORS = {
    k.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    k.KVM_INTERNAL_ERROR_SIMUL_EX: "exception raised while delivering another exception (simultaneous exceptions)",
    k.KVM_INTERNAL_ERROR_DELIVERY_EV: "exit while delivering an event through the guest IDT (bad IDT/GDT/TSS or stack?)",
    k.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "the hardware reported a VM exit KVM does not handle",
}

# Offsets into kvm_run used by run() with struct.unpack_from (one call per exit).
_EXIT_REASON_OFF = ffi.offsetof("struct kvm_run", "exit_reason")
_IO_OFF = ffi.offsetof("struct kvm_run", "io")
_IO_STRUCT = struct.Struct("=BBHIQ")  # direction, size, port, count, data_offset
_MMIO_OFF = ffi.offsetof("struct kvm_run", "mmio")
_MMIO_DATA_OFF = ffi.offsetof("struct kvm_run", "mmio", "data")
_MMIO_LEN_OFF = ffi.offsetof("struct kvm_run", "mmio", "len")
_MMIO_STRUCT = struct.Struct("=Q8xIB")  # phys_addr, (data), len, is_write
_U32 = struct.Struct("=I")

_HALT = Halt()
_INTERRUPTED = Interrupted()
_new = tuple.__new__
_IO_IN, _IO_OUT, _MMIO_READ, _MMIO_WRITE = IoIn, IoOut, MmioRead, MmioWrite
_ioctl_noarg = k.ioctl_noarg
_KVM_RUN = k.KVM_RUN
_TRIPLE_FAULT = Shutdown("triple fault")


def _fail(what: str, err: int) -> AccelError:
    return AccelError("kvm", f"{what} failed: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


def _ioctl(fd: int, request: int, arg, what: str) -> int:
    """One ioctl; a failure becomes AccelError naming ``what``, chained to the OSError."""
    ret = libc.ioctl(fd, request, arg)
    if ret < 0:
        err = ffi.errno
        raise _fail(what, err) from OSError(err, os.strerror(err))
    return ret


def _ulong(value: int):
    return ffi.cast("unsigned long", value)


def _fileno(fd_or_file) -> int:
    return fd_or_file if isinstance(fd_or_file, int) else fd_or_file.fileno()


# --------------------------------------------------------------------------
# Probing


def _check_extension(fd: int, cap: int) -> int:
    ret = libc.ioctl(fd, k.KVM_CHECK_EXTENSION, _ulong(cap))
    return ret if ret > 0 else 0


def is_pvm_host() -> bool:
    """True on a PVM host (KVM in a VM without nested virtualization)."""
    return os.path.exists(_PVM_MODULE)


def probe(device: str = DEVICE) -> tuple[bool, str, list[str]]:
    """Is KVM usable here: ``(usable, reason, notes)``; ``reason`` says exactly what is missing."""
    notes: list[str] = []
    if is_pvm_host():
        notes.append(
            "PVM host (/sys/module/kvm_pvm): guest kernel-mode code is emulated by KVM "
            "(~1 us per instruction) and some instructions fail to emulate"
        )
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"{device} does not exist (KVM module not loaded, or no hardware virtualization)", notes
    except PermissionError:
        return False, f"no permission to open {device} (add the user to the 'kvm' group)", notes
    except OSError as err:
        return False, f"cannot open {device}: {err.strerror}", notes
    try:
        version = libc.ioctl(fd, k.KVM_GET_API_VERSION, _ULONG_ZERO)
        if version < 0:
            return False, f"{device} is not a KVM device (KVM_GET_API_VERSION: {os.strerror(ffi.errno)})", notes
        if version != k.KVM_API_VERSION:
            return False, f"KVM API version is {version}, pyvmm needs {k.KVM_API_VERSION}", notes
        missing = [name for cap, name in REQUIRED_CAPS.items() if not _check_extension(fd, cap)]
        if missing:
            return False, "missing KVM capabilities: " + ", ".join(missing), notes
        if not _check_extension(fd, k.KVM_CAP_EXIT_ON_EMULATION_FAILURE):
            notes.append("no KVM_CAP_EXIT_ON_EMULATION_FAILURE: emulation failures cannot be handed to the interpreter")
        max_vcpus = _check_extension(fd, k.KVM_CAP_MAX_VCPUS) or _check_extension(fd, k.KVM_CAP_NR_VCPUS)
    finally:
        os.close(fd)
    return True, f"{device}, KVM API {version}, all required capabilities, up to {max_vcpus} vCPUs", notes


# --------------------------------------------------------------------------
# The kick signal


def _kick_handler(signum, frame) -> None:
    """Nothing to do: the signal's only purpose is to make KVM_RUN return EINTR."""


def install_kick_handler() -> None:
    """Install the no-op handler for ``KICK_SIGNAL``; main thread only; idempotent."""
    if signal.getsignal(KICK_SIGNAL) is _kick_handler:
        return
    if threading.current_thread() is not threading.main_thread():
        raise AccelError("kvm", "install_kick_handler() must be called from the main thread")
    signal.signal(KICK_SIGNAL, _kick_handler)


def prepare_main_thread() -> None:
    """``accel.prepare_main_thread``: VMs may then be created on any thread (an API server's)."""
    install_kick_handler()


def kick_handler_installed() -> bool:
    return signal.getsignal(KICK_SIGNAL) is _kick_handler


# --------------------------------------------------------------------------
# The VM


class KvmVm:
    """A KVM virtual machine with the in-kernel irqchip (LAPIC, IOAPIC, PIC) and PIT."""

    name = "kvm"
    arch = ARCH

    def __init__(self, *, emulation_failure_exits: bool = True, device: str = DEVICE):
        self._kvm_fd = -1
        self.fd = -1
        self._slots: dict[int, object] = {}  # slot -> cdata of from_buffer (keeps the host buffer exported)
        self._slot_layout: dict[int, tuple[int, int, bool]] = {}  # slot -> (guest_addr, size, readonly)
        self._dirty_log = False
        self.vcpus: list[KvmVcpu] = []
        try:
            self._kvm_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise AccelError("kvm", f"cannot open {device}: {err.strerror}") from err
        try:
            self._setup(emulation_failure_exits)
        except BaseException:
            self.close()
            raise

    def _setup(self, emulation_failure_exits: bool) -> None:
        kvm_fd = self._kvm_fd
        version = _ioctl(kvm_fd, k.KVM_GET_API_VERSION, _ULONG_ZERO, "KVM_GET_API_VERSION")
        if version != k.KVM_API_VERSION:
            raise AccelError("kvm", f"KVM API version is {version}, pyvmm needs {k.KVM_API_VERSION}")
        missing = [name for cap, name in REQUIRED_CAPS.items() if not _check_extension(kvm_fd, cap)]
        if missing:
            raise AccelError("kvm", "missing KVM capabilities: " + ", ".join(missing))
        self.vcpu_mmap_size = _ioctl(kvm_fd, k.KVM_GET_VCPU_MMAP_SIZE, _ULONG_ZERO, "KVM_GET_VCPU_MMAP_SIZE")
        self.fd = _ioctl(kvm_fd, k.KVM_CREATE_VM, _ULONG_ZERO, "KVM_CREATE_VM")
        os.set_inheritable(self.fd, False)
        self.max_vcpus = (
            _check_extension(self.fd, k.KVM_CAP_MAX_VCPUS) or _check_extension(self.fd, k.KVM_CAP_NR_VCPUS) or 4
        )
        self.readonly_memory = bool(_check_extension(self.fd, k.KVM_CAP_READONLY_MEM))

        _ioctl(self.fd, k.KVM_SET_TSS_ADDR, _ulong(TSS_ADDR), "KVM_SET_TSS_ADDR")
        identity = ffi.new("uint64_t *", IDENTITY_MAP_ADDR)
        _ioctl(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR, identity, "KVM_SET_IDENTITY_MAP_ADDR")
        _ioctl(self.fd, k.KVM_CREATE_IRQCHIP, _ULONG_ZERO, "KVM_CREATE_IRQCHIP")
        pit = ffi.new("struct kvm_pit_config *", {"flags": k.KVM_PIT_SPEAKER_DUMMY})
        _ioctl(self.fd, k.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")

        # Emulation failures come back as KVM_EXIT_INTERNAL_ERROR with the instruction
        # bytes, so the fallback manager can hand the vCPU to the interpreter.
        self.emulation_failure_exits = False
        if emulation_failure_exits and _check_extension(self.fd, k.KVM_CAP_EXIT_ON_EMULATION_FAILURE):
            self.enable_cap(k.KVM_CAP_EXIT_ON_EMULATION_FAILURE, 1)
            self.emulation_failure_exits = True
        # CONCURRENT_MAP: KVM_SET_USER_MEMORY_REGION (waiting for an SRCU grace period: ~5 ms here)
        # and vCPU creation take different locks in KVM, and the slot tables here are this VM's own
        caps = {Capability.IN_KERNEL_IRQCHIP, Capability.IRQFD, Capability.IOEVENTFD, Capability.XSAVE_STATE,
                Capability.DIRTY_LOG, Capability.CONCURRENT_MAP}  # fmt: skip
        if _check_extension(self.fd, k.KVM_CAP_SET_GUEST_DEBUG):
            caps |= {Capability.GUEST_DEBUG, Capability.INSTRUCTION_BREAKPOINTS}
        #: KVM_GUESTDBG_* flags this KVM takes (0 where it cannot say: the basic ones)
        self.guest_debug_flags = _check_extension(self.fd, k.KVM_CAP_SET_GUEST_DEBUG2)
        if self.readonly_memory:
            caps.add(Capability.READONLY_MEMORY)
        if self.emulation_failure_exits:
            caps.add(Capability.EMULATION_FAILURE_EXITS)
        self.capabilities = frozenset(caps)

    # ------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM (0 when absent)."""
        return _check_extension(self.fd, cap)

    def enable_cap(self, cap: int, *args: int) -> None:
        enable = ffi.new("struct kvm_enable_cap *", {"cap": cap, "args": list(args)})
        _ioctl(self.fd, k.KVM_ENABLE_CAP, enable, f"KVM_ENABLE_CAP({cap})")

    def map_memory(self, slot: int, guest_addr: int, host_buffer, *, readonly: bool = False) -> None:
        """Make ``host_buffer`` (an mmap) guest RAM at ``guest_addr`` in memory slot ``slot``; no copy.

        Once ``start_dirty_log`` ran, new writable slots are logged too."""
        size = len(host_buffer)
        if guest_addr % mmap.PAGESIZE or size % mmap.PAGESIZE or size == 0:
            raise AccelError("kvm", f"memory slot {slot}: {guest_addr:#x}+{size:#x} is not page-aligned")
        if readonly and not self.readonly_memory:
            raise AccelError("kvm", f"memory slot {slot}: read-only memory needs KVM_CAP_READONLY_MEM")
        try:
            buffer = ffi.from_buffer(host_buffer, require_writable=True)
        except TypeError as err:
            raise AccelError("kvm", f"memory slot {slot}: host buffer must be a writable mmap ({err})") from err
        self._set_region(slot, guest_addr, buffer, size, readonly)
        old = self._slots.pop(slot, None)
        if old is not None:
            ffi.release(old)
        self._slots[slot] = buffer
        self._slot_layout[slot] = (guest_addr, size, readonly)

    def _set_region(self, slot: int, guest_addr: int, buffer, size: int, readonly: bool) -> None:
        flags = k.KVM_MEM_READONLY if readonly else (k.KVM_MEM_LOG_DIRTY_PAGES if self._dirty_log else 0)
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_addr,
                "memory_size": size,
                "userspace_addr": int(ffi.cast("uintptr_t", buffer)),
            },
        )
        _ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region,
               f"KVM_SET_USER_MEMORY_REGION(slot {slot}, {guest_addr:#x}+{size:#x})")  # fmt: skip

    def start_dirty_log(self) -> None:
        """Log the guest's writes to every writable slot (KVM_MEM_LOG_DIRTY_PAGES; KVM changes only the
        flags of a slot set again at the same place). The log starts empty."""
        if self._dirty_log:
            return
        self._dirty_log = True
        for slot, (guest_addr, size, readonly) in self._slot_layout.items():
            if not readonly:
                self._set_region(slot, guest_addr, self._slots[slot], size, readonly)

    def dirty_bitmap(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per 4 KiB page of ``slot`` (bit ``n % 8`` of byte ``n // 8``), set
        for the pages the guest wrote since the last call; the log is cleared by the call."""
        if not self._dirty_log:
            raise AccelError("kvm", "the dirty-page log is not on (start_dirty_log)")
        _, size, _ = self._slot_layout[slot]
        pages = -(-size // mmap.PAGESIZE)
        bitmap = ffi.new("uint64_t[]", -(-pages // 64))  # KVM writes whole longs
        log_request = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        _ioctl(self.fd, k.KVM_GET_DIRTY_LOG, log_request, f"KVM_GET_DIRTY_LOG(slot {slot})")
        return bytes(ffi.buffer(bitmap))[: -(-pages // 8)]

    def unmap_memory(self, slot: int) -> None:
        """Remove memory slot ``slot`` from the guest."""
        region = ffi.new("struct kvm_userspace_memory_region *", {"slot": slot, "memory_size": 0})
        _ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region, f"KVM_SET_USER_MEMORY_REGION(delete slot {slot})")
        buffer = self._slots.pop(slot, None)
        self._slot_layout.pop(slot, None)
        if buffer is not None:
            ffi.release(buffer)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: what KVM can present, before the VMM's trimming."""
        nent = 128
        while True:
            raw = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + nent * ffi.sizeof("struct kvm_cpuid_entry2"))
            cpuid = ffi.cast("struct kvm_cpuid2 *", raw)
            cpuid.nent = nent
            if libc.ioctl(self._kvm_fd, k.KVM_GET_SUPPORTED_CPUID, cpuid) >= 0:
                break
            err = ffi.errno
            if err != errno.E2BIG or nent >= 1 << 16:
                raise _fail("KVM_GET_SUPPORTED_CPUID", err) from OSError(err, os.strerror(err))
            nent *= 2
        return [
            CpuidEntry(e.function, e.index, e.eax, e.ebx, e.ecx, e.edx, bool(e.flags & _CPUID_FLAG_SIGNIFICANT_INDEX))
            for e in (cpuid.entries[i] for i in range(cpuid.nent))
        ]

    def supported_msrs(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs KVM saves and restores."""
        count = 512
        while True:
            raw = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + 4 * count)
            msr_list = ffi.cast("struct kvm_msr_list *", raw)
            msr_list.nmsrs = count
            if libc.ioctl(self._kvm_fd, k.KVM_GET_MSR_INDEX_LIST, msr_list) >= 0:
                return [msr_list.indices[i] for i in range(msr_list.nmsrs)]
            err = ffi.errno
            if err != errno.E2BIG or count >= 1 << 16:
                raise _fail("KVM_GET_MSR_INDEX_LIST", err) from OSError(err, os.strerror(err))
            count = max(count * 2, msr_list.nmsrs)

    def create_vcpu(self, index: int) -> KvmVcpu:
        if not 0 <= index < self.max_vcpus:
            raise AccelError("kvm", f"vCPU index {index} out of range: this host supports {self.max_vcpus} vCPUs")
        vcpu = KvmVcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def set_irq_line(self, irq: int, level: bool) -> None:
        """Drive IOAPIC pin / ISA IRQ ``irq``; safe from any thread (a fresh struct per call)."""
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": 1 if level else 0})
        _ioctl(self.fd, k.KVM_IRQ_LINE, line, f"KVM_IRQ_LINE(irq {irq})")

    def irqfd(self, irq: int, eventfd, *, resample=None, deassign: bool = False) -> None:
        """Raise ``irq`` whenever ``eventfd`` (an fd or object with ``fileno()``) is written.

        Without ``resample`` the line is pulsed (edge). With a ``resample`` eventfd the line
        stays raised until the guest's EOI, when KVM lowers it and signals ``resample``.
        """
        fields = {"fd": _fileno(eventfd), "gsi": irq, "flags": 0}
        if resample is not None:
            fields["flags"] |= k.KVM_IRQFD_FLAG_RESAMPLE
            fields["resamplefd"] = _fileno(resample)
        if deassign:
            fields["flags"] = k.KVM_IRQFD_FLAG_DEASSIGN  # KVM matches by fd and gsi
        request = ffi.new("struct kvm_irqfd *", fields)
        _ioctl(self.fd, k.KVM_IRQFD, request, f"KVM_IRQFD(irq {irq})")

    def ioeventfd(self, addr: int, length: int, eventfd, datamatch: int | None = None, pio: bool = False,
                  *, deassign: bool = False) -> None:
        """Signal ``eventfd`` instead of exiting when the guest writes ``length`` bytes at ``addr``
        (MMIO, or port I/O with ``pio``), optionally only when the value equals ``datamatch``."""
        if length not in (0, 1, 2, 4, 8):
            raise AccelError("kvm", f"ioeventfd at {addr:#x}: length must be 0, 1, 2, 4 or 8, not {length}")
        flags = 0
        if datamatch is not None:
            flags |= k.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= k.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= k.KVM_IOEVENTFD_FLAG_DEASSIGN
        request = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": _fileno(eventfd), "flags": flags},
        )
        _ioctl(self.fd, k.KVM_IOEVENTFD, request, f"KVM_IOEVENTFD({'port' if pio else 'mmio'} {addr:#x})")

    def signal_msi(self, address: int, data: int) -> int:
        """Inject one MSI; returns >0 when delivered, 0 when the guest blocked it."""
        msi = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32,
                                           "data": data})
        return _ioctl(self.fd, k.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    # ------------------------------------------------------------------ platform state (snapshots)
    def save_platform_state(self) -> dict:
        """The in-kernel PIC pair, IOAPIC, PIT and kvmclock, as KVM gives them (raw structures, hex)."""
        chips = {}
        for name, chip_id in (("pic_master", k.KVM_IRQCHIP_PIC_MASTER), ("pic_slave", k.KVM_IRQCHIP_PIC_SLAVE),
                              ("ioapic", k.KVM_IRQCHIP_IOAPIC)):  # fmt: skip
            chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
            _ioctl(self.fd, k.KVM_GET_IRQCHIP, chip, f"KVM_GET_IRQCHIP({name})")
            chips[name] = bytes(ffi.buffer(chip)).hex()
        pit = ffi.new("struct kvm_pit_state2 *")
        _ioctl(self.fd, k.KVM_GET_PIT2, pit, "KVM_GET_PIT2")
        clock = ffi.new("struct kvm_clock_data *")
        _ioctl(self.fd, k.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        # count_load_time is host CLOCK_MONOTONIC ns: the clock at the save lets another backend rebase it
        return {"kind": "kvm", "irqchip": chips, "pit2": bytes(ffi.buffer(pit)).hex(), "clock": int(clock.clock),
                "ktime_ns": time.monotonic_ns()}

    def restore_platform_state(self, state: dict) -> None:
        if state.get("kind") != "kvm":
            raise AccelError("kvm", f"cannot load {state.get('kind')!r} interrupt-controller state into KVM's in-kernel ones")
        try:
            for name in ("pic_master", "pic_slave", "ioapic"):
                raw = bytes.fromhex(state["irqchip"][name])
                chip = ffi.new("struct kvm_irqchip *")
                if len(raw) != ffi.sizeof(chip[0]):
                    raise ValueError(f"{name}: {len(raw)} bytes, not {ffi.sizeof(chip[0])}")
                ffi.memmove(chip, raw, len(raw))
                _ioctl(self.fd, k.KVM_SET_IRQCHIP, chip, f"KVM_SET_IRQCHIP({name})")
            raw = bytes.fromhex(state["pit2"])
            pit = ffi.new("struct kvm_pit_state2 *")
            if len(raw) != ffi.sizeof(pit[0]):
                raise ValueError(f"pit2: {len(raw)} bytes, not {ffi.sizeof(pit[0])}")
            ffi.memmove(pit, raw, len(raw))
            _ioctl(self.fd, k.KVM_SET_PIT2, pit, "KVM_SET_PIT2")
            clock = ffi.new("struct kvm_clock_data *", {"clock": int(state["clock"])})
            _ioctl(self.fd, k.KVM_SET_CLOCK, clock, "KVM_SET_CLOCK")
        except (KeyError, ValueError, TypeError) as err:
            raise AccelError("kvm", f"bad in-kernel device state in the snapshot: {err}") from err

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        for buffer in self._slots.values():
            ffi.release(buffer)
        self._slots.clear()
        for attr in ("fd", "_kvm_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_vm(vcpu_count: int, **options) -> KvmVm:
    """The entry point ``pyvmm.accel.open_vm`` uses; also installs the kick handler when on the main thread."""
    if threading.current_thread() is threading.main_thread():
        install_kick_handler()
    vm = KvmVm(**options)
    if vcpu_count > vm.max_vcpus:
        vm.close()
        raise AccelError("kvm", f"{vcpu_count} vCPUs requested, this host supports {vm.max_vcpus}")
    return vm


# --------------------------------------------------------------------------
# vCPUs

_SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
STATE_VERSION = 1
_MP_STATES = {
    k.KVM_MP_STATE_RUNNABLE: "runnable",
    k.KVM_MP_STATE_HALTED: "halted",
    k.KVM_MP_STATE_UNINITIALIZED: "wait-for-sipi",
    k.KVM_MP_STATE_INIT_RECEIVED: "wait-for-sipi",
}
_MP_STATE_CODES = {"runnable": k.KVM_MP_STATE_RUNNABLE, "halted": k.KVM_MP_STATE_HALTED,
                   "wait-for-sipi": k.KVM_MP_STATE_UNINITIALIZED}  # fmt: skip
_SEGMENT_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")
_SEGMENT_BOOLS = frozenset(("present", "db", "s", "l", "g", "avl", "unusable"))
_REG_NAMES = tuple(Regs.__dataclass_fields__)


def _struct_to_dict(cdata) -> dict:
    """A kvm struct as nested dicts of ints (arrays as lists), for state that moves between backends."""
    out = {}
    for name, field in ffi.typeof(cdata).fields:
        value = getattr(cdata, name)
        if field.type.kind == "struct":
            out[name] = _struct_to_dict(value)
        elif field.type.kind == "array":
            out[name] = list(value)
        else:
            out[name] = value
    return out


class KvmVcpu:
    def __init__(self, vm: KvmVm, index: int):
        self.index = index
        self.vm = vm
        self.fd = _ioctl(vm.fd, k.KVM_CREATE_VCPU, _ulong(index), f"KVM_CREATE_VCPU({index})")
        os.set_inheritable(self.fd, False)
        try:
            self._mmap = mmap.mmap(self.fd, vm.vcpu_mmap_size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            os.close(self.fd)
            raise AccelError("kvm", f"cannot mmap kvm_run of vCPU {index}: {err.strerror}") from err
        self._page = memoryview(self._mmap)
        self._run_buffer = ffi.from_buffer(self._mmap)
        self.kvm_run = ffi.cast("struct kvm_run *", self._run_buffer)
        self._pending: deque = deque()  # the remaining accesses of a string I/O exit
        self._views: dict[tuple[int, int], memoryview] = {}  # (offset, size) -> view of kvm_run
        #: the thread inside run(), and whether it is inside KVM_RUN (for request_stop's kick)
        self.thread_id: int | None = None
        self._in_kvm_run = False
        self._regs = ffi.new("struct kvm_regs *")
        self._sregs = ffi.new("struct kvm_sregs *")
        self._fpu = ffi.new("struct kvm_fpu *")
        self._debug = GuestDebug()

    # ------------------------------------------------------------------ run
    def run(self) -> VcpuExit:
        pending = self._pending
        if pending:
            return pending.popleft()
        self.thread_id = threading.get_ident()
        self._in_kvm_run = True
        ret = _ioctl_noarg(self.fd, _KVM_RUN, 0)
        self._in_kvm_run = False
        if ret < 0:
            err = ffi.errno
            if err == errno.EINTR or err == errno.EAGAIN:
                self.kvm_run.immediate_exit = 0
                return _INTERRUPTED
            raise _fail(f"KVM_RUN (vCPU {self.index})", err) from OSError(err, os.strerror(err))
        page = self._page
        reason = _U32.unpack_from(page, _EXIT_REASON_OFF)[0]
        # Exits are built with tuple.__new__ (half the cost of the NamedTuple
        # constructor) around cached views of kvm_run's data area: a view is
        # valid until the next run(), which is all the run loop needs.
        if reason == 2:  # KVM_EXIT_IO
            direction, size, port, count, offset = _IO_STRUCT.unpack_from(page, _IO_OFF)
            if count == 1:
                view = self._views.get((offset, size))
                if view is None:
                    view = self._views[(offset, size)] = page[offset : offset + size]
                return _new(_IO_OUT if direction else _IO_IN, (port, view))
            return self._string_io(direction, size, port, count, offset)
        if reason == 6:  # KVM_EXIT_MMIO
            addr, length, is_write = _MMIO_STRUCT.unpack_from(page, _MMIO_OFF)
            view = self._views.get((_MMIO_DATA_OFF, length))
            if view is None:
                view = self._views[(_MMIO_DATA_OFF, length)] = page[_MMIO_DATA_OFF : _MMIO_DATA_OFF + length]
            return _new(_MMIO_WRITE if is_write else _MMIO_READ, (addr, view))
        return self._slow_exit(reason)

    def _string_io(self, direction: int, size: int, port: int, count: int, offset: int) -> VcpuExit:
        """``rep ins/outs``: KVM hands over ``count`` accesses at once; return them one by one."""
        page = self._page
        make = IoOut if direction else IoIn
        accesses = []
        for i in range(count):
            start = offset + i * size
            view = page[start : start + size]
            accesses.append(make(port, view.tobytes() if direction else view))
        self._pending.extend(accesses[1:])
        return accesses[0]

    def _slow_exit(self, reason: int) -> VcpuExit:
        run = self.kvm_run
        if reason == k.KVM_EXIT_HLT:
            return _HALT
        if reason == k.KVM_EXIT_SHUTDOWN:
            return _TRIPLE_FAULT
        if reason == k.KVM_EXIT_INTR:
            return _INTERRUPTED
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            kind = _SYSTEM_EVENTS.get(run.system_event.type)
            if kind is not None:
                return SystemEvent(kind)
            return InternalError("unexpected system event",
                                 f"KVM system event type {run.system_event.type}", self._rip())
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            return self._internal_error()
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            hw = run.fail_entry.hardware_entry_failure_reason
            return InternalError(
                "VM entry failed",
                f"hardware entry failure reason {hw:#x} on host CPU {run.fail_entry.cpu}: the vCPU state is "
                "invalid for VM entry (check the segment registers, CR0/CR4/EFER and the GDT set by the loader)",
                self._rip(),
            )
        if reason == k.KVM_EXIT_EXCEPTION:
            return InternalError("guest exception exit",
                                 f"exception {run.ex.exception} error code {run.ex.error_code:#x}", self._rip())
        if reason == k.KVM_EXIT_DEBUG:
            return self._debug_exit()
        if reason == k.KVM_EXIT_UNKNOWN:
            return InternalError("unknown KVM exit",
                                 f"hardware exit reason {run.hw.hardware_exit_reason:#x}", self._rip())
        name = k.EXIT_REASON_NAMES.get(reason, str(reason))
        return InternalError("unhandled KVM exit", f"{name} is not handled by pyvmm", self._rip())

    def _internal_error(self) -> VcpuExit:
        run = self.kvm_run
        suberror = run.internal.suberror
        if suberror == k.KVM_INTERNAL_ERROR_EMULATION:
            failure = run.emulation_failure
            insn = b""
            if failure.flags & k.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                size = min(failure.insn_size, 15)
                insn = bytes(ffi.buffer(failure.insn_bytes, size))
            rip = self._rip()
            if insn[:1] == b"\xcc" and rip in self._debug.software_breakpoints:
                # A PVM host's KVM cannot emulate int3 at CPL0: the debugger's int3 arrives here
                # (with KVM_GUESTDBG_USE_SW_BP a VT-x/AMD-V host exits with KVM_EXIT_DEBUG instead)
                return Debug("breakpoint", rip)
            return EmulationFailure(rip, insn)
        what = _INTERNAL_SUBERRORS.get(suberror, f"suberror {suberror}")
        ndata = min(run.internal.ndata, 16)
        data = " ".join(f"{run.internal.data[i]:#x}" for i in range(ndata))
        return InternalError("KVM internal error", f"{what}" + (f"; data: {data}" if data else ""), self._rip())

    def _rip(self) -> int | None:
        try:
            return self.get_regs().rip
        except AccelError:
            return None

    # ------------------------------------------------------------------ stop
    def request_stop(self) -> None:
        """From any thread: the current or next run() returns Interrupted promptly."""
        self.kvm_run.immediate_exit = 1
        thread_id = self.thread_id
        if self._in_kvm_run and thread_id is not None and thread_id != threading.get_ident():
            # Without our handler the default action of the signal would kill the process.
            if kick_handler_installed():
                try:
                    signal.pthread_kill(thread_id, KICK_SIGNAL)
                except ProcessLookupError:
                    pass  # the thread has just gone

    # ------------------------------------------------------------------ registers
    def get_regs(self) -> Regs:
        regs = self._regs
        _ioctl(self.fd, k.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return Regs(*(getattr(regs, name) for name in _REG_NAMES))

    def set_regs(self, regs: Regs) -> None:
        raw = self._regs
        for name in _REG_NAMES:
            setattr(raw, name, getattr(regs, name))
        _ioctl(self.fd, k.KVM_SET_REGS, raw, "KVM_SET_REGS")

    def get_sregs(self) -> SpecialRegs:
        raw = self._sregs
        _ioctl(self.fd, k.KVM_GET_SREGS, raw, "KVM_GET_SREGS")
        segments = {}
        for name in _SEGMENT_NAMES:
            seg = getattr(raw, name)
            segments[name] = Segment(**{f: (bool(getattr(seg, f)) if f in _SEGMENT_BOOLS else getattr(seg, f))
                                        for f in _SEGMENT_FIELDS})
        return SpecialRegs(
            **segments,
            gdt=DescriptorTable(raw.gdt.base, raw.gdt.limit),
            idt=DescriptorTable(raw.idt.base, raw.idt.limit),
            cr0=raw.cr0, cr2=raw.cr2, cr3=raw.cr3, cr4=raw.cr4, cr8=raw.cr8, efer=raw.efer, apic_base=raw.apic_base,
        )

    def set_sregs(self, sregs: SpecialRegs) -> None:
        # A fresh struct: interrupt_bitmap stays zero, pending interrupts travel in the vCPU events.
        raw = ffi.new("struct kvm_sregs *")
        for name in _SEGMENT_NAMES:
            seg, out = getattr(sregs, name), getattr(raw, name)
            for f in _SEGMENT_FIELDS:
                setattr(out, f, int(getattr(seg, f)))
        raw.gdt.base, raw.gdt.limit = sregs.gdt.base, sregs.gdt.limit
        raw.idt.base, raw.idt.limit = sregs.idt.base, sregs.idt.limit
        raw.cr0, raw.cr2, raw.cr3, raw.cr4, raw.cr8 = sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8
        raw.efer, raw.apic_base = sregs.efer, sregs.apic_base
        _ioctl(self.fd, k.KVM_SET_SREGS, raw, "KVM_SET_SREGS")

    def get_fpu(self) -> FpuState:
        raw = self._fpu
        _ioctl(self.fd, k.KVM_GET_FPU, raw, "KVM_GET_FPU")
        return FpuState(
            fcw=raw.fcw, fsw=raw.fsw, ftwx=raw.ftwx, last_opcode=raw.last_opcode, last_ip=raw.last_ip,
            last_dp=raw.last_dp,
            fpr=[bytes(ffi.buffer(raw.fpr[i])) for i in range(8)],
            xmm=[bytes(ffi.buffer(raw.xmm[i])) for i in range(16)],
            mxcsr=raw.mxcsr,
        )

    def set_fpu(self, fpu: FpuState) -> None:
        """Through the XSAVE area: KVM_SET_FPU writes the legacy region but leaves XSTATE_BV, so a guest
        whose x87/SSE components were in their init state would still see zeros (measured here)."""
        self.set_xsave(fpu_into_xsave(self.get_xsave(), fpu))

    @staticmethod
    def _new_msrs(count: int):
        raw = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + count * ffi.sizeof("struct kvm_msr_entry"))
        msrs = ffi.cast("struct kvm_msrs *", raw)
        msrs.nmsrs = count
        return raw, msrs

    # ------------------------------------------------------------------ debugging
    def set_guest_debug(self, debug: GuestDebug) -> None:
        """KVM_SET_GUEST_DEBUG: single-step (interrupts held off where KVM takes BLOCKIRQ), the
        debugger's int3s (USE_SW_BP) and the hardware debug registers (USE_HW_BP)."""
        control = 0
        if debug.active:
            control = k.KVM_GUESTDBG_ENABLE
            if debug.single_step:
                control |= k.KVM_GUESTDBG_SINGLESTEP
                if self.vm.guest_debug_flags & k.KVM_GUESTDBG_BLOCKIRQ:
                    control |= k.KVM_GUESTDBG_BLOCKIRQ
            if debug.software_breakpoints:
                control |= k.KVM_GUESTDBG_USE_SW_BP
            if debug.dr7 & 0xFF:
                control |= k.KVM_GUESTDBG_USE_HW_BP
        request = ffi.new("struct kvm_guest_debug *", {"control": control})
        for index, address in enumerate(debug.addresses):
            request.arch.debugreg[index] = address
        request.arch.debugreg[7] = debug.dr7 if debug.dr7 & 0xFF else 0
        _ioctl(self.fd, k.KVM_SET_GUEST_DEBUG, request, f"KVM_SET_GUEST_DEBUG (vCPU {self.index})")
        self._debug = debug

    def _debug_exit(self) -> VcpuExit:
        arch = self.kvm_run.debug.arch
        if arch.exception == 3 and arch.pc in self._debug.software_breakpoints:
            return Debug("breakpoint", arch.pc)
        if arch.exception == 1:
            dr6 = arch.dr6
            if dr6 & 0xF and self._debug.dr7 & 0xFF:
                return Debug("debug-register", arch.pc, dr6)
            if self._debug.single_step:
                return Debug("step", arch.pc, dr6)
        return InternalError("debug exit", f"debug exception {arch.exception} at {arch.pc:#x} (dr6 {arch.dr6:#x}) "
                             "that no debugger asked for", self._rip())  # fmt: skip

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        raw, msrs = self._new_msrs(len(indices))
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        done = _ioctl(self.fd, k.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        if done < len(indices):
            raise AccelError("kvm", f"KVM_GET_MSRS: MSR {indices[done]:#x} cannot be read on vCPU {self.index}")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(len(indices))}

    def set_msrs(self, msrs: dict[int, int]) -> None:
        items = list(msrs.items())
        raw, out = self._new_msrs(len(items))
        for i, (index, value) in enumerate(items):
            out.entries[i].index = index
            out.entries[i].data = value & 0xFFFFFFFFFFFFFFFF
        done = _ioctl(self.fd, k.KVM_SET_MSRS, out, "KVM_SET_MSRS")
        if done < len(items):
            index, value = items[done]
            raise AccelError("kvm", f"KVM_SET_MSRS: MSR {index:#x} = {value:#x} rejected on vCPU {self.index}")

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        raw = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", raw)
        cpuid.nent = len(entries)
        for i, e in enumerate(entries):
            out = cpuid.entries[i]
            out.function, out.index = e.function, e.index
            out.flags = _CPUID_FLAG_SIGNIFICANT_INDEX if e.indexed else 0
            out.eax, out.ebx, out.ecx, out.edx = e.eax, e.ebx, e.ecx, e.edx
        _ioctl(self.fd, k.KVM_SET_CPUID2, cpuid, f"KVM_SET_CPUID2 ({len(entries)} entries)")

    # ------------------------------------------------------------------ full state (for moving a vCPU)
    def get_lapic(self) -> bytes:
        """The 1 KiB local APIC register page."""
        raw = ffi.new("struct kvm_lapic_state *")
        _ioctl(self.fd, k.KVM_GET_LAPIC, raw, "KVM_GET_LAPIC")
        return bytes(ffi.buffer(raw))

    def set_lapic(self, state: bytes) -> None:
        if len(state) != ffi.sizeof("struct kvm_lapic_state"):
            raise AccelError("kvm", f"set_lapic: state must be {ffi.sizeof('struct kvm_lapic_state')} bytes")
        raw = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(raw)[:] = state
        _ioctl(self.fd, k.KVM_SET_LAPIC, raw, "KVM_SET_LAPIC")

    def get_vcpu_events(self) -> dict:
        """Pending/injected exception, interrupt, NMI, SMI as nested dicts (field names of kvm_vcpu_events)."""
        raw = ffi.new("struct kvm_vcpu_events *")
        _ioctl(self.fd, k.KVM_GET_VCPU_EVENTS, raw, "KVM_GET_VCPU_EVENTS")
        return _struct_to_dict(raw[0])

    def set_vcpu_events(self, events: dict) -> None:
        try:
            raw = ffi.new("struct kvm_vcpu_events *", events)
        except (TypeError, KeyError, ValueError, OverflowError) as err:
            raise AccelError("kvm", f"set_vcpu_events: bad events {err}") from err
        _ioctl(self.fd, k.KVM_SET_VCPU_EVENTS, raw, "KVM_SET_VCPU_EVENTS")

    def get_events(self) -> PendingEvents:
        """The pending/injected events in neutral form (the raw struct rides along for set_events)."""
        raw = self.get_vcpu_events()
        exc, irq, nmi = raw["exception"], raw["interrupt"], raw["nmi"]
        being = exc["injected"] or exc["pending"]
        return PendingEvents(
            exception=exc["nr"] if being else None,
            exception_error_code=exc["error_code"] if being and exc["has_error_code"] else None,
            exception_pending=bool(exc["pending"]) and not exc["injected"],
            interrupt=irq["nr"] if irq["injected"] else None,
            interrupt_soft=bool(irq["soft"]),
            nmi_injected=bool(nmi["injected"]),
            nmi_pending=bool(nmi["pending"]),
            nmi_masked=bool(nmi["masked"]),
            shadow=irq["shadow"],
            private=raw,
        )

    def set_events(self, events: PendingEvents) -> None:
        raw = events.private if events.private is not None else self.get_vcpu_events()
        exc, irq, nmi = raw["exception"], raw["interrupt"], raw["nmi"]
        exc["injected"] = int(events.exception is not None and not events.exception_pending)
        exc["pending"] = int(events.exception is not None and events.exception_pending)
        exc["nr"] = events.exception or 0
        exc["has_error_code"] = int(events.exception_error_code is not None)
        exc["error_code"] = events.exception_error_code or 0
        irq["injected"] = int(events.interrupt is not None)
        irq["nr"] = events.interrupt or 0
        irq["soft"] = int(events.interrupt_soft)
        irq["shadow"] = events.shadow
        nmi["injected"], nmi["pending"], nmi["masked"] = int(events.nmi_injected), int(events.nmi_pending), int(events.nmi_masked)
        raw["flags"] = raw.get("flags", 0) | k.KVM_VCPUEVENT_VALID_NMI_PENDING | k.KVM_VCPUEVENT_VALID_SHADOW
        self.set_vcpu_events(raw)

    def get_xcr0(self) -> int:
        return self.get_xcrs().get(0, 1)

    def set_xcr0(self, value: int) -> None:
        self.set_xcrs({0: value})

    def save_state(self) -> VcpuState:
        """Everything KVM holds for this vCPU; the architectural part neutral, the rest private."""
        msrs = {}
        for msr in SAVED_MSRS:
            try:
                msrs.update(self.get_msrs([msr]))
            except AccelError:
                pass  # not on this host's KVM
        xsave = self.get_xsave()
        cpu = X86CpuState(
            regs=self.get_regs(), sregs=self.get_sregs(), fpu=fpu_from_fxsave(xsave), xcr0=self.get_xcr0(),
            msrs=msrs, events=self.get_events(), lapic=self.get_lapic(),
            mp_state=_MP_STATES.get(self.get_mp_state(), "runnable"),
        )  # fmt: skip
        return VcpuState("kvm", ARCH, STATE_VERSION, cpu, {"xsave": xsave, "xcrs": self.get_xcrs()})

    def restore_state(self, state: VcpuState) -> None:
        try:
            cpu = restorable(state, "kvm", STATE_VERSION)
        except StateError as err:
            raise AccelError("kvm", str(err)) from err
        private = state.private if state.backend == "kvm" else {}
        self.set_sregs(cpu.sregs)
        self.set_regs(cpu.regs)
        if "xsave" in private:
            self.set_xcrs(private["xcrs"])
            self.set_xsave(fpu_into_xsave(private["xsave"], cpu.fpu))
        else:
            if cpu.xcr0 != self.get_xcr0():
                self.set_xcr0(cpu.xcr0)
            self.set_fpu(cpu.fpu)
        if cpu.msrs:
            self.set_msrs(cpu.msrs)
        if cpu.lapic is not None:
            self.set_lapic(cpu.lapic)
        self.set_mp_state(_MP_STATE_CODES[cpu.mp_state])
        events = cpu.events
        if state.backend != "kvm":
            events = PendingEvents(**{f: getattr(events, f) for f in events.__dataclass_fields__ if f != "private"})
        self.set_events(events)

    def get_xsave(self) -> bytes:
        """The 4 KiB XSAVE area (standard format, offsets as host CPUID leaf 0xD)."""
        raw = ffi.new("struct kvm_xsave *")
        _ioctl(self.fd, k.KVM_GET_XSAVE, raw, "KVM_GET_XSAVE")
        return bytes(ffi.buffer(raw))

    def set_xsave(self, state: bytes) -> None:
        if len(state) != ffi.sizeof("struct kvm_xsave"):
            raise AccelError("kvm", f"set_xsave: state must be {ffi.sizeof('struct kvm_xsave')} bytes")
        raw = ffi.new("struct kvm_xsave *")
        ffi.buffer(raw)[:] = state
        _ioctl(self.fd, k.KVM_SET_XSAVE, raw, "KVM_SET_XSAVE")

    def get_xcrs(self) -> dict[int, int]:
        """Extended control registers: ``{0: XCR0, ...}``."""
        raw = ffi.new("struct kvm_xcrs *")
        _ioctl(self.fd, k.KVM_GET_XCRS, raw, "KVM_GET_XCRS")
        return {raw.xcrs[i].xcr: raw.xcrs[i].value for i in range(min(raw.nr_xcrs, 16))}

    def set_xcrs(self, xcrs: dict[int, int]) -> None:
        if len(xcrs) > 16:
            raise AccelError("kvm", f"set_xcrs: at most 16 XCRs, got {len(xcrs)}")
        raw = ffi.new("struct kvm_xcrs *")
        raw.nr_xcrs = len(xcrs)
        for i, (xcr, value) in enumerate(xcrs.items()):
            raw.xcrs[i].xcr, raw.xcrs[i].value = xcr, value
        _ioctl(self.fd, k.KVM_SET_XCRS, raw, "KVM_SET_XCRS")

    def get_mp_state(self) -> int:
        """``KVM_MP_STATE_*`` (runnable, halted, waiting for INIT/SIPI, ...)."""
        raw = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, k.KVM_GET_MP_STATE, raw, "KVM_GET_MP_STATE")
        return raw.mp_state

    def set_mp_state(self, state: int) -> None:
        raw = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        _ioctl(self.fd, k.KVM_SET_MP_STATE, raw, "KVM_SET_MP_STATE")

    def get_tsc_khz(self) -> int:
        """The guest TSC frequency KVM presents, in kHz."""
        return _ioctl(self.fd, k.KVM_GET_TSC_KHZ, _ULONG_ZERO, "KVM_GET_TSC_KHZ")

    # ------------------------------------------------------------------
    def close(self) -> None:
        if self.fd < 0:
            return
        self._pending.clear()
        self.kvm_run = None
        ffi.release(self._run_buffer)
        # Every view of kvm_run must go before the mmap can close: Python's mmap holds a dup of
        # the vCPU fd until then (the vCPU, its fd and kvm_run page leaked per VM before this).
        for view in self._views.values():
            view.release()
        self._views.clear()
        self._page.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # an exit's data view is still referenced; the mapping goes with it
        os.close(self.fd)
        self.fd = -1
