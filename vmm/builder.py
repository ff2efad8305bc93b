"""Config -> a ready-to-start ``Machine``, in one straight line (after Firecracker's builder).

    backend -> guest memory -> buses and devices -> kernel, initrd, cmdline,
    boot info -> MP table -> vCPUs (CPUID, MSRs, boot registers) -> loops
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from pyvmm import accel
from pyvmm.accel.core import Capability
from pyvmm.accel.registry import BY_NAME
from pyvmm.config import VmConfig
from pyvmm.devices.irq import IrqLine
from pyvmm.devices.legacy.cmos import Cmos
from pyvmm.devices.legacy.debug_exit import DebugExit
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.post import PostCode
from pyvmm.devices.legacy.serial import Serial
from pyvmm.devices.legacy.testdev import PcTestdev
from pyvmm.devices.virtio.balloon import PAGES_PER_MIB, VirtioBalloon
from pyvmm.devices.virtio.blk import VirtioBlock
from pyvmm.devices.virtio.mmio import QUEUE_NOTIFY, VirtioMmio, cmdline_entry
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.tap import TapBackend
from pyvmm.devices.virtio.vsock import VirtioVsock
from pyvmm.errors import ConfigError
from pyvmm.vmm import layout
from pyvmm.vmm import snapshot as vmsnapshot
from pyvmm.vmm.boot.acpi import write_acpi_tables
from pyvmm.vmm.boot.bootparams import write_boot_params
from pyvmm.vmm.boot.cmdline import write_cmdline
from pyvmm.vmm.boot.e820 import e820_map
from pyvmm.vmm.boot.initrd import load_initrd
from pyvmm.vmm.boot.kernel import load_kernel
from pyvmm.vmm.boot import multiboot
from pyvmm.vmm.boot import mptable
from pyvmm.vmm.boot.pvh import write_pvh_start_info
from pyvmm.vmm.bus import MmioBus, PioBus
from pyvmm.vmm.events import EventLoop
from pyvmm.vmm.irqfd import IrqfdLine
from pyvmm.vmm.machine import Machine
from pyvmm.vmm.memory import GuestMemory
from pyvmm.vmm.vcpu import Lifecycle, VcpuLoop
from pyvmm.vmm.x86.cpuid import build_cpuid, portable_cpuid
from pyvmm.vmm.x86.msrs import boot_msrs
from pyvmm.vmm.x86.regs import boot_cpu_state

log = logging.getLogger("pyvmm.builder")


def build_machine(
    config: VmConfig,
    *,
    console_output: Callable[[bytes], None],
    extra_pio: list[tuple[int, int, object]] = (),
    extra_mmio: list[tuple[int, int, object]] = (),
    snapshot: tuple[dict, str, str] | None = None,
) -> Machine:
    """Build a VM from a validated config. Nothing runs until ``Machine.start()``.

    With ``snapshot`` = (state, memory file, state file name), the machine is the snapshot's:
    guest RAM mapped from the memory file, no kernel loaded, each vCPU, interrupt controller
    and device given its saved state (vmm/snapshot.py)."""
    vcpu_count = config.machine.vcpus
    vm, rejected = accel.open_vm(config.machine.accel, vcpu_count)
    for probe in rejected:
        log.info("accelerator %s skipped: %s", probe.name, probe.reason)
    log.info("accelerator: %s", vm.name)
    memory = None
    mapping = None
    virtio: list[VirtioMmio] = []
    events = None
    try:
        if vcpu_count > vm.max_vcpus:
            raise ConfigError(
                f"{vcpu_count} vCPUs is more than the {vm.max_vcpus} the {vm.name} accelerator allows here",
                file=config.source,
                key="machine.vcpus",
            )
        if vcpu_count > mptable.max_vcpus():
            raise ConfigError(
                f"{vcpu_count} vCPUs is more than the {mptable.max_vcpus()} the MP table in the EBDA can describe",
                file=config.source,
                key="machine.vcpus",
            )

        if snapshot is None and config.shares:  # a vhost-user backend maps guest RAM too
            memory = GuestMemory.shared(layout.ram_layout(config.machine.memory_mib << 20))
        elif snapshot is None:
            memory = GuestMemory.anonymous(layout.ram_layout(config.machine.memory_mib << 20))
        else:
            state, mem_path, source = snapshot
            saved = state["memory"]
            chain = [*saved.get("base_chain", []), {"file": str(mem_path), "ranges": saved.get("ranges")}]
            memory = vmsnapshot.map_memory_chain(chain, [tuple(r) for r in saved["regions"]])
        mapping = _MapMemory(vm, memory)
        dirty_log = config.machine.track_dirty_pages and Capability.DIRTY_LOG in vm.capabilities
        if dirty_log:
            # Diff snapshots: guest memory records the VMM's own writes (devices, the fallback's
            # stepper) from before anything can write; the hypervisor's log starts with its slots
            memory.track_writes()

        lifecycle = Lifecycle()
        pio, mmio = PioBus(), MmioBus()
        devices = _legacy_devices(vm, memory, lifecycle, console_output)
        if config.debug.test_device:
            devices.update(PcTestdev(vm.set_irq_line).regions())
        for name, (device, bus, base, size) in devices.items():
            (pio if bus == "pio" else mmio).insert(device, base, size)
        for base, size, device in extra_pio:
            pio.insert(device, base, size)
        for base, size, device in extra_mmio:
            mmio.insert(device, base, size)

        cmdline = config.boot.cmdline
        fallback_on = config.machine.fallback and Capability.EMULATION_FAILURE_EXITS in vm.capabilities
        if fallback_on and snapshot is None:
            from pyvmm.accel.fallback.policy import pvm_kernel_cmdline

            cmdline = pvm_kernel_cmdline(cmdline, config.boot.kernel, pvm=_on_pvm(vm))
        windows = []  # (base, size, gsi) of each virtio-mmio device, for the ACPI DSDT
        if config.virtio_device_count:
            events = EventLoop("virtio")
            virtio, windows = _virtio_devices(config, vm, memory, mmio, events)
            cmdline = " ".join([cmdline, *(cmdline_entry(base, gsi) for base, _, gsi in windows)])

        if snapshot is None:
            # Both the MP table (kernels with CONFIG_X86_MPPARSE) and ACPI's MADT
            # (Debian's cloud kernel reads only ACPI) describe the CPUs and IOAPIC.
            mptable.write_mptable(memory, vcpu_count)
            rsdp = write_acpi_tables(memory, vcpu_count, windows)
            mode, entry, boot_info = _load_guest(config, memory, rsdp, cmdline)

        fallback, supported = _fallback(config, vm, memory, pio, mmio) if fallback_on else (None, vm.supported_cpuid())
        portable = config.machine.cpu == "portable"
        if portable:
            supported = portable_cpuid(supported, vm.name, vcpu_count)
        signature = _signature("pyvmm" if portable else vm.name)  # a portable guest must not rely on kvmclock
        serve_directly = Capability.SERVE_IO_DIRECTLY in vm.capabilities
        loops = []
        for index in range(vcpu_count):
            vcpu = vm.create_vcpu(index)
            cpuid = build_cpuid(supported, index, vcpu_count, hypervisor_signature=signature)
            if snapshot is not None:  # the guest keeps the CPUID it was shown, if this backend can offer it
                offered, cpuid = cpuid, vmsnapshot.saved_cpuid(state, index)
                problem = vmsnapshot.cpuid_problem(cpuid, offered)
                if problem:
                    raise vmsnapshot.SnapshotError(f"{source}: cannot restore on {vm.name}: {problem}")
            vcpu.set_cpuid(cpuid)
            if fallback is not None:
                fallback.set_cpuid(index, cpuid)
            vcpu.set_msrs(boot_msrs())
            if index == 0 and snapshot is None:  # application processors wait for the guest's INIT/SIPI
                regs, sregs = boot_cpu_state(memory, mode, entry, boot_info)
                vcpu.set_sregs(sregs)
                vcpu.set_regs(regs)
            loop = VcpuLoop(vcpu, pio, mmio, lifecycle, fallback=fallback, serve_directly=serve_directly)
            loop.cpuid = cpuid
            loops.append(loop)
        lifecycle.on_stop(lambda: [loop.vcpu.request_stop() for loop in loops])
        all_devices = {name: entry[0] for name, entry in devices.items()}
        all_devices["i8042"] = all_devices["i8042.data"]._controller  # the controller behind its two ports
        all_devices.update((t.name, t) for t in virtio)
        machine = Machine(
            vm=vm,
            memory=memory,
            pio=pio,
            mmio=mmio,
            lifecycle=lifecycle,
            loops=loops,
            devices=all_devices,
            virtio=virtio,
            events=events,
            rejected_accels=rejected,
            fallback=fallback,
            dirty_log=dirty_log,
        )
        if snapshot is not None:
            vmsnapshot.restore_processors(machine, state, source)
            vmsnapshot.restore_devices(machine, state, source)
        mapping.wait()  # no vCPU has run yet: guest RAM is in place before the first one does
        if dirty_log:
            vm.start_dirty_log()
        return machine
    except BaseException:
        if mapping is not None:
            mapping.wait(raising=False)  # the hypervisor's call ends before the VM is closed under it
        for transport in virtio:
            transport.close()
        if events is not None:
            events.close()
        vm.close()
        if memory is not None:
            memory.close()
        raise


class _MapMemory:
    """Guest RAM given to the hypervisor, slot after slot. Where the backend allows it
    (``Capability.CONCURRENT_MAP``) on its own thread, beside the rest of the set-up: KVM's slot
    registration is its slowest call (an SRCU grace period, ~5 ms here, most of a restore).
    ``wait()`` before any vCPU can run; it raises what the mapping raised."""

    def __init__(self, vm, memory):
        self._vm, self._memory = vm, memory
        self._error: BaseException | None = None
        self._thread = None
        if Capability.CONCURRENT_MAP in vm.capabilities:
            self._thread = threading.Thread(target=self._run, name="map-memory", daemon=True)
            self._thread.start()
        else:
            self._map()

    def _map(self) -> None:
        for slot, region in enumerate(self._memory.regions):
            self._vm.map_memory(slot, region.guest_addr, region.buffer)

    def _run(self) -> None:
        try:
            self._map()
        except BaseException as err:  # raised on the builder's thread by wait()
            self._error = err

    def wait(self, *, raising: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
        if raising and self._error is not None:
            error, self._error = self._error, None
            raise error


def _fallback(config: VmConfig, vm, memory, pio, mmio):
    """The interpreter fallback for the hypervisor's emulation failures, and the CPUID the vCPUs may be offered.

    On a PVM host (KVM emulates all guest kernel code and fails on some of it) the
    guest is offered only features the interpreter can also execute; on other
    hosts failures are rare and the hypervisor's full set stays. The interpreter
    itself is loaded at the first failure, not here.
    """
    from pyvmm.accel.fallback.manager import FallbackManager
    from pyvmm.accel.fallback.policy import fallback_cpuid

    supported = vm.supported_cpuid()
    if _on_pvm(vm):
        supported = fallback_cpuid(supported, vcpu_count=config.machine.vcpus)
    title = BY_NAME[vm.name].title
    log.info("interpreter fallback on for %s emulation failures", title)
    return FallbackManager(memory, pio, mmio, vm.capabilities, hypervisor=title), supported


def _on_pvm(vm) -> bool:
    if vm.name != "kvm":
        return False
    from pyvmm.accel import kvm

    return kvm.is_pvm_host()


def _signature(backend: str) -> str:
    # Linux treats "KVMKVMKVM" as KVM and then uses KVM's paravirtual MSRs; only KVM may claim it.
    return "KVMKVMKVM\0\0\0" if backend == "kvm" else "pyvmmpyvmm\0\0"


def _legacy_devices(vm, memory, lifecycle, console_output):
    """name -> (device, bus, base, size)."""

    def line(irq):
        return IrqLine(irq, vm.set_irq_line)

    i8042 = I8042(lifecycle.request_exit, line(layout.IRQ_KEYBOARD))
    return {
        "serial": (Serial(line(layout.IRQ_COM1), console_output), "pio", layout.PORT_COM1, 8),
        "i8042.data": (i8042.data_port, "pio", layout.PORT_I8042, 1),
        "i8042.command": (i8042.command_port, "pio", layout.PORT_I8042 + 4, 1),
        "cmos": (Cmos(memory.size), "pio", layout.PORT_CMOS, 2),
        "post": (PostCode(), "pio", layout.PORT_POST, 1),
        "debug-exit": (DebugExit(lifecycle.request_exit), "pio", layout.PORT_DEBUG_EXIT, 1),
    }


def _virtio_devices(config: VmConfig, vm, memory: GuestMemory, mmio: MmioBus, events: EventLoop):
    """One virtio-mmio window and interrupt line per device: drives, then NICs, the RNG, shares, the balloon and vsock.

    Returns the transports and their windows ``(base, size, gsi)``.
    """
    models = []
    for i, drive in enumerate(config.drives):
        models.append((f"virtio-blk{i}", lambda d=drive: VirtioBlock.open(d.path, read_only=d.read_only, serial=d.serial,
                                                                          rate_limiter=d.rate_limiter,
                                                                          lock=d.lock)))
    for i, net in enumerate(config.nets):
        models.append((f"virtio-net{i}", lambda n=net: VirtioNet(TapBackend(n.tap), mac=n.mac,
                                                                 rx_rate_limiter=n.rx_rate_limiter,
                                                                 tx_rate_limiter=n.tx_rate_limiter)))
    if config.rng:
        models.append(("virtio-rng", lambda: VirtioRng(rate_limiter=config.rng_rate_limiter)))
    for i, share in enumerate(config.shares):
        models.append((f"virtio-fs{i}", lambda s=share, n=f"virtio-fs{i}": _virtio_fs(s, n)))
    if config.balloon is not None:
        balloon = config.balloon
        models.append(("virtio-balloon", lambda: VirtioBalloon(
            target_pages=balloon.amount_mib * PAGES_PER_MIB, deflate_on_oom=balloon.deflate_on_oom,
            stats_polling_interval_s=balloon.stats_polling_interval_s)))
    if config.vsock is not None:
        vsock = config.vsock
        models.append(("virtio-vsock", lambda: VirtioVsock(vsock.guest_cid, vsock.uds_path)))
    transports, windows = [], []
    try:
        for n, (name, make) in enumerate(models):
            base = layout.VIRTIO_MMIO_BASE + n * layout.VIRTIO_MMIO_SIZE
            irq = layout.virtio_irqs()[n]
            transport = VirtioMmio(make(), memory, _virtio_irq_line(vm, irq, events), name=name)
            transports.append(transport)
            windows.append((base, layout.VIRTIO_MMIO_SIZE, irq))
            mmio.insert(transport, base, layout.VIRTIO_MMIO_SIZE)
            notify_fds = transport.attach(events)
            # Where the hypervisor can, queue notifications reach the event loop
            # without a vCPU exit (KVM ioeventfd: datamatch = queue index).
            if Capability.IOEVENTFD in vm.capabilities:
                for index, notifier in enumerate(notify_fds):
                    if notifier.is_eventfd:
                        vm.ioeventfd(base + QUEUE_NOTIFY, 4, notifier.fileno(), datamatch=index)
            log.info("%s at %#x, IRQ %d", name, base, irq)
    except BaseException:
        for transport in transports:
            transport.close()
        raise
    return transports, windows


def _virtio_fs(share, name: str):
    """A virtiofsd for ``share`` and the virtio-fs device connected to it (the device stops the
    daemon when it closes; if the device cannot be made, the daemon is stopped here)."""
    from pyvmm.devices.vhost_user.frontend import Frontend
    from pyvmm.devices.virtio.fs import VirtioFs
    from pyvmm.host.virtiofsd import Virtiofsd

    daemon = Virtiofsd(share.path, read_only=share.read_only, name=name).start()
    frontend = None
    try:
        frontend = Frontend.connect(daemon.socket_path, name=name)
        device = VirtioFs(frontend, share.tag, name=name, backend_process=daemon)
    except BaseException:
        if frontend is not None:
            frontend.close()
        daemon.stop()
        raise
    log.info("%s: %s shared as %r%s (virtiofsd pid %d)", name, share.path, share.tag,
             " read-only" if share.read_only else "", daemon.pid)  # fmt: skip
    return device


def _virtio_irq_line(vm, irq: int, events: EventLoop) -> IrqLine:
    """A KVM irqfd where the VM offers one (no ioctl per interrupt), else the VM's set_irq_line."""
    if Capability.IRQFD in vm.capabilities:
        return IrqfdLine(irq, vm, events)
    return IrqLine(irq, vm.set_irq_line)


def _load_multiboot_modules(config: VmConfig, memory: GuestMemory, kernel, initrd) -> list[multiboot.Module]:
    """The initrd as module 0, then each ``[[boot.module]]`` page-aligned below the one before."""
    modules = []
    if initrd is not None:
        modules.append(multiboot.Module(initrd[0], initrd[0] + initrd[1], str(config.boot.initrd)))
    below = initrd[0] if initrd is not None else None
    for module in config.boot.modules:
        addr, size = load_initrd(memory, str(module.path), kernel, below=below, what="multiboot module")
        modules.append(multiboot.Module(addr, addr + size, module.cmdline))
        below = addr
    return modules


def _load_guest(config: VmConfig, memory: GuestMemory, rsdp: int, cmdline: str) -> tuple[str, int, int]:
    """Load kernel and initrd and write the boot information. Returns (mode, entry, boot_info)."""
    boot = config.boot
    kernel = load_kernel(memory, str(boot.kernel))
    initrd = load_initrd(memory, str(boot.initrd), kernel) if boot.initrd else None
    if kernel.multiboot_entry is not None:
        # as GRUB and QEMU pass it: the kernel's path first (argv[0] to kernels that split it)
        cmdline = f"{boot.kernel} {cmdline}" if cmdline else str(boot.kernel)
    cmdline_addr, cmdline_size = write_cmdline(memory, cmdline, kernel)
    e820 = e820_map(memory)
    if boot.modules and kernel.multiboot_entry is None:
        raise ConfigError("modules are for a multiboot kernel; this one boots by PVH or the Linux protocol, "
                          "which take the initrd only", file=config.source, key="boot.module")  # fmt: skip
    if kernel.multiboot_entry is not None:
        modules = _load_multiboot_modules(config, memory, kernel, initrd)
        info = multiboot.write_multiboot_info(memory, cmdline_addr=cmdline_addr, e820=e820, modules=modules)
        return "multiboot", kernel.multiboot_entry, info
    if kernel.pvh_entry is not None:
        info = write_pvh_start_info(
            memory, cmdline_addr=cmdline_addr, e820=e820, modules=[initrd] if initrd else [], rsdp_addr=rsdp
        )
        return "pvh32", kernel.pvh_entry, info
    if kernel.linux64_entry is None:
        raise ConfigError(
            "the ELF has neither a PVH entry note nor a usable 64-bit entry point",
            file=config.source,
            key="boot.kernel",
        )
    info = write_boot_params(
        memory,
        kernel=kernel,
        cmdline_addr=cmdline_addr,
        cmdline_size=cmdline_size,
        initrd=initrd,
        e820=e820,
        rsdp_addr=rsdp,
    )
    return "linux64", kernel.linux64_entry, info
