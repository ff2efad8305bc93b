"""A built VM: its memory, backend, buses, devices and vCPU loops, with start/wait/stop."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from pyvmm.errors import PyvmmError
from pyvmm.vmm.bus import MmioBus, PioBus
from pyvmm.vmm.memory import GuestMemory
from pyvmm.vmm.vcpu import ExitStatus, Lifecycle, VcpuLoop
from pyvmm.arch.x86.msrs import EFER_LMA
from pyvmm.arch.x86.registers import CR0_PE

log = logging.getLogger("pyvmm.machine")


@dataclass
class Machine:
    vm: object  # VmOps
    memory: GuestMemory
    pio: PioBus
    mmio: MmioBus
    lifecycle: Lifecycle
    loops: list[VcpuLoop] = field(default_factory=list)
    devices: dict[str, object] = field(default_factory=dict)
    #: virtio-mmio transports, and the event loop that runs their I/O
    virtio: list = field(default_factory=list)
    events: object | None = None
    #: backends skipped while choosing this one, with their reasons
    rejected_accels: list = field(default_factory=list)
    #: the interpreter fallback for KVM emulation failures (accel/fallback.py), when on
    fallback: object | None = None
    #: the hypervisor keeps a dirty-page log and memory tracks the VMM's writes (Diff snapshots)
    dirty_log: bool = False
    _closed: bool = False
    _started: bool = False

    def __post_init__(self):
        self.lifecycle.on_stop(self.release_paused)  # a stop must reach paused vCPUs and held devices

    @property
    def accel(self) -> str:
        return self.vm.name

    def start(self, *, paused: bool = False) -> None:
        """Start the devices and the vCPU threads; with ``paused`` the vCPUs wait for ``resume()``."""
        if self._started:
            return
        self._started = True
        if self.events is not None:
            self.events.start()  # device I/O must be served before the guest can notify
        for loop in self.loops:
            loop.start(paused=paused)
        log.info("VM started: %d vCPU(s) on %s%s", len(self.loops), self.accel, " (paused)" if paused else "")

    def pause(self, timeout: float = 10.0) -> bool:
        """Every vCPU parked at an instruction boundary, then the devices' event loop held after the
        work already queued (a virtio request in progress completes). False when a vCPU did not park
        in time (the caller resumes)."""
        deadline = time.monotonic() + timeout
        for loop in self.loops:
            loop.request_pause()
        if not all(loop.wait_parked(deadline) for loop in self.loops):
            return False
        if self.events is not None and not self.events.hold(max(0.1, deadline - time.monotonic())):
            return False
        return True

    def resume(self) -> None:
        if self.events is not None:
            self.events.release()
        for loop in self.loops:
            loop.release()

    def release_paused(self) -> None:
        """After an exit request: wake parked vCPU loops and a held event loop so they can end."""
        self.resume()

    def replace_drive(self, index: int, path: str) -> None:
        """Give drive ``index`` a new backing image (same read-only setting and lock rule)."""
        from pyvmm.devices.virtio.blk import RawImage, VirtioBlock

        drives = [t for t in self.virtio if isinstance(t.device, VirtioBlock)]
        if not 0 <= index < len(drives):
            raise PyvmmError(f"drive {index} does not exist ({len(drives)} drives)")
        transport = drives[index]
        image = RawImage(path, read_only=transport.device.read_only, lock=transport.device.image.lock_requested)
        transport.update_device(lambda: transport.device.replace_image(image))
        log.info("%s: image replaced by %s (%d bytes)", transport.name, path, image.size)

    def _transports(self, device_type) -> list:
        return [t for t in self.virtio if isinstance(t.device, device_type)]

    def set_drive_rate_limiter(self, index: int, config) -> None:
        """Drive ``index`` is limited by ``config`` (a ``RateLimiterConfig``) from its next request on."""
        from pyvmm.devices.virtio.blk import VirtioBlock

        drives = self._transports(VirtioBlock)
        if not 0 <= index < len(drives):
            raise PyvmmError(f"drive {index} does not exist ({len(drives)} drives)")
        with drives[index].lock:
            drives[index].device.set_rate_limiter(config)

    def set_net_rate_limiters(self, index: int, rx=None, tx=None) -> None:
        """NIC ``index`` gets new receive and/or transmit limits (None: that direction unchanged)."""
        from pyvmm.devices.virtio.net import VirtioNet

        nets = self._transports(VirtioNet)
        if not 0 <= index < len(nets):
            raise PyvmmError(f"network interface {index} does not exist ({len(nets)} interfaces)")
        with nets[index].lock:
            nets[index].device.set_rate_limiters(rx, tx)

    def _balloon(self):
        from pyvmm.devices.virtio.balloon import VirtioBalloon

        balloons = self._transports(VirtioBalloon)
        if not balloons:
            raise PyvmmError("this VM has no balloon device")
        return balloons[0]

    def set_balloon_target(self, amount_mib: int) -> None:
        """Ask the guest's balloon driver to hold ``amount_mib`` MiB (a configuration-change interrupt)."""
        from pyvmm.devices.virtio.balloon import PAGES_PER_MIB

        if not 0 <= amount_mib <= self.memory.size >> 20:
            raise PyvmmError(f"balloon target of {amount_mib} MiB must be between 0 and the guest's {self.memory.size >> 20} MiB")
        transport = self._balloon()
        transport.update_device(lambda: transport.device.set_target(amount_mib * PAGES_PER_MIB))

    def set_balloon_stats_interval(self, seconds: int) -> None:
        transport = self._balloon()
        with transport.lock:
            transport.device.set_stats_interval(seconds)

    def balloon_statistics(self) -> dict:
        """The target and what the guest holds (pages and MiB), and the guest's last memory statistics."""
        from pyvmm.devices.virtio.balloon import PAGES_PER_MIB

        transport = self._balloon()
        with transport.lock:
            device = transport.device
            if not device.stats_enabled:
                raise PyvmmError("balloon statistics are off (the balloon was configured with stats_polling_interval_s 0)")
            return {"target_pages": device.target_pages, "actual_pages": device.actual_pages,
                    "target_mib": device.target_pages // PAGES_PER_MIB, "actual_mib": device.actual_pages // PAGES_PER_MIB,
                    **device.stats}  # fmt: skip

    @property
    def paused(self) -> bool:
        return bool(self.loops) and all(loop.parked for loop in self.loops)

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Block until the VM exits; returns its status (None on timeout)."""
        if not self.lifecycle.exited.wait(timeout):
            return None
        self._join_vcpus()
        return self.lifecycle.status

    def stop(self, reason: str = "stopped by the host", code: int = 0) -> ExitStatus:
        """End the VM from the host side (idempotent) and wait for the vCPU threads."""
        self.lifecycle.request_exit(code, reason)
        self._join_vcpus()
        return self.lifecycle.status

    def _join_vcpus(self, timeout: float = 10.0) -> None:
        for loop in self.loops:
            if loop.thread is not None and loop.thread is not threading.current_thread():
                loop.thread.join(timeout)
                if loop.thread.is_alive():
                    log.warning("vcpu%d did not stop within %.0f s", loop.vcpu.index, timeout)

    def vcpu_positions(self) -> list[str]:
        """Where each vCPU stands, for a run that was stopped from outside (a hang or a timeout)."""
        lines = []
        for loop in self.loops:
            vcpu = loop.vcpu
            try:
                regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            except Exception as err:  # a backend that cannot tell: say so, do not fail the report
                lines.append(f"vcpu{vcpu.index}: state unreadable ({err})")
                continue
            mode = "long" if sregs.efer & EFER_LMA else ("protected" if sregs.cr0 & CR0_PE else "real")
            lines.append(
                f"vcpu{vcpu.index}: rip {regs.rip:#x} cs {sregs.cs.selector:#x} (CPL {sregs.cs.selector & 3}, {mode} mode), "
                f"rsp {regs.rsp:#x}, rflags {regs.rflags:#x}"
            )
        return lines

    def exit_counts(self) -> dict[str, int]:
        """Exits per kind, summed over vCPUs."""
        total: dict[str, int] = {}
        for loop in self.loops:
            for kind, count in loop.exit_counts.items():
                total[kind.__name__] = total.get(kind.__name__, 0) + count
        return total

    def device_metrics(self) -> dict[str, dict]:
        """Per virtio device: requests, bytes, errors, resets."""
        return {transport.name: transport.metrics() for transport in self.virtio}

    def fallback_summary(self) -> list[str]:
        """Interpreter fallbacks: total, cost each, and counts per instruction (empty when none)."""
        return self.fallback.summary() if self.fallback is not None else []

    def close(self) -> None:
        if self._closed:
            return
        if self._started and not self.lifecycle.stopping:
            self.stop()
        self._closed = True
        for line in self.fallback_summary():
            log.info("%s", line)
        alive = any(loop.thread is not None and loop.thread.is_alive() for loop in self.loops)
        if self.events is not None:
            self.events.stop()
        for device in self.devices.values():
            close = getattr(device, "close", None)
            if close:
                close()
        if self.events is not None:
            self.events.close()
        if alive:
            # A vCPU thread stuck in the hypervisor still uses the fds and memory.
            log.warning("vCPU threads still running; leaving the VM's resources to process exit")
            return
        for loop in self.loops:
            loop.vcpu.close()
        if self.fallback is not None:
            self.fallback.close()  # its engines map guest memory
        self.vm.close()
        self.memory.close()
