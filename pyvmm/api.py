"""The embedding API: everything ``pyvmm boot`` does, as Python.

    from pyvmm import VM

    with VM.from_config("guest.toml") as vm:      # or VM.from_dict({...})
        vm.start()
        vm.console.wait_for("login:", timeout=60)
        vm.pause()                                # every vCPU at an instruction boundary
        vm.resume()
        vm.console.write(b"root\\n")
        status = vm.wait(timeout=120)
    print(status.code, status.reason)

    for event in vm.events():                     # started, paused, resumed, ..., stopped
        print(event.kind, event.state, event.reason)

The CLI (pyvmm/cli.py) is a thin layer over this module, which is one over the
VM controller (vmm/controller.py) and its lifecycle table (vmm/states.py).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import BinaryIO

from pyvmm.config import VmConfig, config_from_dict, load_config, parse_accel
from pyvmm.errors import PyvmmError
from pyvmm.vmm.controller import VmController
from pyvmm.vmm.states import VmState
from pyvmm.vmm.vcpu import ExitStatus

log = logging.getLogger("pyvmm")

_CONSOLE_KEEP = 4 << 20  # bytes of console output kept for wait_for()/output


class Console:
    """The guest's serial console (COM1): everything it printed, and a way to type."""

    def __init__(self, echo: BinaryIO | None = None):
        self._echo = echo
        self._buffer = bytearray()
        self._dropped = 0  # bytes discarded from the front when the buffer is full
        self._cond = threading.Condition()
        self._serial = None

    # called by the UART on the vCPU thread
    def _output(self, data: bytes) -> None:
        if self._echo is not None:
            self._echo.write(data)
            self._echo.flush()
        with self._cond:
            self._buffer += data
            if len(self._buffer) > _CONSOLE_KEEP:
                cut = len(self._buffer) - _CONSOLE_KEEP
                del self._buffer[:cut]
                self._dropped += cut
            self._cond.notify_all()

    @property
    def output(self) -> bytes:
        """All console output so far (the last 4 MiB)."""
        with self._cond:
            return bytes(self._buffer)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def tail(self, size: int = 2000) -> str:
        """The last ``size`` bytes of console output, as text (for error messages)."""
        with self._cond:
            return bytes(self._buffer[-size:]).decode("utf-8", "replace")

    def write(self, data: bytes | str) -> None:
        """Type into the guest's console."""
        if isinstance(data, str):
            data = data.encode()
        if self._serial is None:
            raise PyvmmError("the VM has no console yet (build it first)")
        self._serial.enqueue_input(data)

    def wait_for(self, pattern: str | bytes | re.Pattern, timeout: float | None = None, *, start: int = 0) -> re.Match:
        """Wait until console output (from byte offset ``start``) matches ``pattern``; return the match.

        Raises ``TimeoutError`` naming the pattern, with the output's tail, when it does not appear.
        """
        if isinstance(pattern, str):
            pattern = re.compile(re.escape(pattern.encode()))
        elif isinstance(pattern, bytes):
            pattern = re.compile(re.escape(pattern))
        elif isinstance(pattern.pattern, str):
            pattern = re.compile(pattern.pattern.encode(), pattern.flags & ~re.UNICODE)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                offset = max(0, start - self._dropped)
                match = pattern.search(self._buffer, offset)
                if match:
                    return match
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    tail = bytes(self._buffer[-300:]).decode("utf-8", "replace")
                    raise TimeoutError(f"console did not show {pattern.pattern!r} within {timeout} s; last output: {tail!r}")
                self._cond.wait(remaining)

    def wait_for_line(self, text: str, timeout: float | None = None) -> str:
        """Wait for a complete line (newline-terminated) containing ``text``; return it without the newline."""
        match = self.wait_for(re.compile(rb"[^\n]*" + re.escape(text.encode()) + rb"[^\n]*\n"), timeout)
        return match.group(0).decode("utf-8", "replace").rstrip("\r\n")


def _rate_limiter(config):
    """A ``RateLimiterConfig`` from one or from Firecracker's RateLimiter dict (None stays None)."""
    from pyvmm.devices.ratelimit import RateLimiterConfig

    return RateLimiterConfig.from_dict(config) if isinstance(config, dict) else config


class _VcpuView:
    """One vCPU's registers for embedding code (the VM paused)."""

    def __init__(self, vcpu, vm):
        self._vcpu, self._vm = vcpu, vm

    def regs(self):
        self._vm._require_paused("regs")
        return self._vcpu.get_regs()

    def sregs(self):
        self._vm._require_paused("sregs")
        return self._vcpu.get_sregs()

    def fpu(self):
        self._vm._require_paused("fpu")
        return self._vcpu.get_fpu()

    def msrs(self, indices: list[int]) -> dict[int, int]:
        self._vm._require_paused("msrs")
        return self._vcpu.get_msrs(list(indices))


class VM:
    """A virtual machine built from a config. Use as a context manager, or call ``close()``."""

    def __init__(self, config: VmConfig, *, accel: str | list[str] | None = None, echo: BinaryIO | None = None,
                 journal=None):  # fmt: skip
        """``journal``: a file the lifecycle events are appended to, one JSON object per line."""
        if accel is not None:
            config.machine.accel = parse_accel(accel, source="accel argument", key="accel")
        self.config = config
        self._setup(echo, journal)
        self.controller.configure(config, **self._build_options())

    def _setup(self, echo, journal) -> None:
        """What every VM object has, configured or restored: the console, devices to add, the controller."""
        self.console = Console(echo)
        self._extra_pio: list = []
        self._extra_mmio: list = []
        self._servers: list = []
        self._gdb = None
        self._recorder = None  # coverage and trace: vmm/coverage.py, fed by the vCPUs' block traces
        self.controller = VmController(journal=journal)

    def _build_options(self) -> dict:
        return {"console_output": self.console._output, "extra_pio": self._extra_pio, "extra_mmio": self._extra_mmio}

    @classmethod
    def from_config(cls, path, **kwargs) -> VM:
        return cls(load_config(path), **kwargs)

    @classmethod
    def from_dict(cls, data: dict, *, base_dir=".", **kwargs) -> VM:
        return cls(config_from_dict(data, base_dir=base_dir), **kwargs)

    # --- scripting hooks ------------------------------------------------
    def add_pio_device(self, base: int, size: int, device) -> None:
        """Attach a Python device (``read(offset, data)``/``write(offset, data)``) to port I/O."""
        self._before_build("add_pio_device")
        self._extra_pio.append((base, size, device))

    def add_mmio_device(self, base: int, size: int, device) -> None:
        """Attach a Python device to guest-physical MMIO ``[base, base+size)``."""
        self._before_build("add_mmio_device")
        self._extra_mmio.append((base, size, device))

    def _before_build(self, what: str) -> None:
        if self.controller.machine is not None:
            raise PyvmmError(f"{what}: the VM is already built; attach devices before start()")

    # --- lifecycle -------------------------------------------------------
    @property
    def machine(self):
        """The built ``Machine`` (memory, buses, devices, vCPU loops), building it on first use."""
        if self.controller.machine is None:
            machine = self.controller.build()
            self.console._serial = machine.devices["serial"]
        return self.controller.machine

    @property
    def accel(self) -> str:
        return self.machine.accel

    @property
    def state(self) -> VmState:
        return self.controller.state

    def start(self) -> VM:
        """Build if needed, start the devices and the vCPUs (paused), then resume them. With
        ``[debug] gdb`` the gdb stub serves first (``gdb_wait``: the vCPUs wait for gdb), and
        ``[debug] coverage``/``trace`` start recording at the first instruction."""
        self.machine  # noqa: B018 - builds, and connects the console
        debug = self.config.debug
        if debug.gdb is not None and self._gdb is None:
            self.serve_gdb(debug.gdb)
        if debug.coverage is not None:
            self.start_coverage(debug.coverage)
        if debug.trace is not None:
            self.start_trace(debug.trace, limit_mib=debug.trace_limit_mib)
        self.controller.start(hold=debug.gdb is not None and debug.gdb_wait)
        return self

    def pause(self) -> None:
        """Stop every vCPU at an instruction boundary and hold the devices (Running -> Paused)."""
        self.controller.pause()

    def resume(self) -> None:
        self.controller.resume()

    def snapshot(self, path, mem_path, *, diff: bool = False) -> dict:
        """Write a snapshot of the paused VM: its state to ``path``, guest RAM to ``mem_path``."""
        return self.controller.snapshot(path, mem_path, diff=diff)

    @classmethod
    def restore(cls, path, mem_path, *, accel: str | list[str] | None = None, resume: bool = False,
                echo: BinaryIO | None = None, journal=None, track_dirty_pages: bool | None = None) -> VM:  # fmt: skip
        """A VM rebuilt from a snapshot (on ``accel``, by default the first usable backend), Paused
        unless ``resume``. Any backend whose CPUID covers what the guest was shown can take it.
        ``track_dirty_pages`` turns the dirty-page log on or off for later Diff snapshots (default:
        as the snapshotted VM had it)."""
        vm = cls.__new__(cls)
        vm._setup(echo, journal)
        order = parse_accel(accel, source="accel argument", key="accel") if accel is not None else None
        vm.controller.restore(path, mem_path, accel=order, track_dirty_pages=track_dirty_pages, **vm._build_options())
        vm.config = vm.controller.config
        vm.console._serial = vm.controller.machine.devices["serial"]
        if resume:  # after the console is connected, so input typed at once reaches the guest
            vm.resume()
        return vm

    def replace_drive(self, index: int, path) -> None:
        """Back drive ``index`` (config order) with another image while the VM runs; the guest is told
        its size may have changed (a virtio configuration-change interrupt)."""
        self.machine.replace_drive(index, path)

    def set_drive_rate_limiter(self, index: int, config) -> None:
        """Limit drive ``index`` (config order) by ``config`` (a ``pyvmm.devices.ratelimit.RateLimiterConfig``,
        or Firecracker's RateLimiter as a dict) from its next request on; a request waiting for the old
        limit is reconsidered at once."""
        config = _rate_limiter(config)
        self.machine.set_drive_rate_limiter(index, config)
        self.config.drives[index].rate_limiter = config  # a snapshot keeps the live limits

    def set_net_rate_limiters(self, index: int, rx=None, tx=None) -> None:
        """New receive and/or transmit limits for NIC ``index`` (None leaves a direction as it is)."""
        rx, tx = _rate_limiter(rx), _rate_limiter(tx)
        self.machine.set_net_rate_limiters(index, rx, tx)
        net = self.config.nets[index]
        net.rx_rate_limiter = rx if rx is not None else net.rx_rate_limiter
        net.tx_rate_limiter = tx if tx is not None else net.tx_rate_limiter

    def set_balloon(self, amount_mib: int) -> None:
        """Ask the guest to give ``amount_mib`` MiB back through its balloon driver (it gets there in its
        own time: ``balloon_statistics()["actual_mib"]`` says how far it is)."""
        self.machine.set_balloon_target(amount_mib)
        self.config.balloon.amount_mib = amount_mib

    def set_balloon_statistics_interval(self, seconds: int) -> None:
        """Poll the guest's memory statistics every ``seconds`` (the first poll at once); statistics
        cannot be switched on or off after the balloon was configured."""
        self.machine.set_balloon_stats_interval(seconds)
        self.config.balloon.stats_polling_interval_s = seconds

    def balloon_statistics(self) -> dict:
        """Firecracker's BalloonStats: target and actual (pages, MiB) and the guest's last statistics
        (swap_in, ..., free_memory, total_memory, available_memory, ... in bytes or counts)."""
        return self.machine.balloon_statistics()

    # --- commands in the guest (pyvmm's guest agent over vsock) ----------------------------
    def exec(self, argv, *, input: bytes | None = None, timeout: float | None = None, env: dict | None = None,
             cwd: str | None = None, uid: int | None = None, gid: int | None = None, groups: list[int] | None = None,
             stdin=None, stdout=None, stderr=None, port: int | None = None, connect_timeout: float = 30.0):  # fmt: skip
        """Run ``argv`` in the guest through pyvmm's guest agent (pyvmm/run/agent.py listening on vsock
        ``port``; ``pyvmm.run.guest.start`` boots guests that run it) and wait for it. Returns a
        ``CommandResult``: ``status, stdout, stderr = vm.exec([...])``, plus ``signal`` and ``timed_out``.
        A command still running after ``timeout`` seconds is killed with its process group, and the
        VM stays usable. ``stdin``/``stdout``/``stderr``: binary streams to stream through instead of
        ``input`` and the collected output. Commands may run one after another or at once."""
        from pyvmm.run import agent
        from pyvmm.run.session import connect_vsock, run_command

        sock = connect_vsock(self._vsock_path("exec"), agent.DEFAULT_PORT if port is None else port,
                             timeout=connect_timeout)  # fmt: skip
        return run_command(sock, list(argv) if isinstance(argv, (list, tuple)) else argv, input=input, stdin=stdin,
                           stdout=stdout, stderr=stderr, timeout=timeout, env=env, cwd=cwd, uid=uid, gid=gid,
                           groups=groups)  # fmt: skip

    def wait_for_agent(self, *, timeout: float = 60.0, port: int | None = None) -> None:
        """Block until the guest agent accepts connections; ``PyvmmError`` (with the console's last
        lines) if the VM stops or ``timeout`` passes first."""
        from pyvmm.run import agent
        from pyvmm.run.session import AgentError, connect_vsock

        uds = self._vsock_path("wait_for_agent")
        deadline = time.monotonic() + timeout
        while True:
            status = self.machine.wait(0)
            if status is not None:
                raise PyvmmError(f"the guest stopped before its agent came up ({status.reason}); console: "
                                 f"{self.console.tail(400)!r}")  # fmt: skip
            try:
                connect_vsock(uds, agent.DEFAULT_PORT if port is None else port, timeout=0.5).close()
                return
            except AgentError:
                if time.monotonic() >= deadline:
                    raise PyvmmError(f"the guest agent did not answer within {timeout:.0f} s; console: "
                                     f"{self.console.tail(400)!r}") from None  # fmt: skip

    def _vsock_path(self, what: str) -> str:
        vsock = getattr(self.config, "vsock", None)
        if vsock is None:
            raise PyvmmError(f"{what}: this VM has no vsock device ([vsock] guest_cid, uds_path) to reach a guest agent")
        return str(vsock.uds_path)

    def events(self, timeout: float | None = None):
        """The lifecycle events from now on (``vmm.states.VmEvent``); the iterator ends after ``stopped``."""
        return self.controller.events(timeout)

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Wait for the guest to end; None when ``timeout`` passes first."""
        return self.machine.wait(timeout)

    def stop(self) -> ExitStatus:
        return self.machine.stop()

    def run(self, timeout: float | None = None) -> ExitStatus:
        """Start, wait for the end (stopping it after ``timeout`` seconds), return the status."""
        self.start()
        status = self.wait(timeout)
        if status is None:
            status = self.machine.stop(f"timed out after {timeout} s", code=124)
        return status

    def serve_api(self, path, *, instance_id: str = "anonymous-instance"):
        """Serve Firecracker's API for this VM on the Unix socket ``path`` (GET /, PATCH /vm, actions,
        GET /vm/config); the server stops when the VM is closed. Returns the server."""
        from pyvmm.server.http import ApiServer
        from pyvmm.server.routes import FirecrackerApi

        server = ApiServer(path, FirecrackerApi.for_vm(self, instance_id=instance_id))
        self._servers.append(server)
        return server

    # --- debugging: gdb, introspection, coverage and traces ------------------------------------
    def serve_gdb(self, address: str):
        """Serve gdb's remote protocol for this VM on ``"HOST:PORT"`` or a Unix socket path (before or
        after start; one session at a time; attaching stops every vCPU). Returns the server (its
        ``address`` has the real port when 0 was asked)."""
        from pyvmm.gdb.machine import MachineTarget
        from pyvmm.gdb.server import GdbServer

        self._gdb = GdbServer(lambda: MachineTarget(self.machine), address)
        self._gdb.start()
        self._servers.append(self._gdb)
        return self._gdb

    def vcpu(self, index: int):
        """vCPU ``index`` of the built machine: ``regs()``, ``sregs()``, ``fpu()`` (pause the VM first)."""
        from pyvmm.vmm.introspect import vcpu_of

        return _VcpuView(vcpu_of(self.machine, index), self)

    def read_physical(self, address: int, size: int) -> bytes:
        from pyvmm.vmm import introspect

        return introspect.read_physical(self.machine, address, size)

    def read_virtual(self, vcpu: int, address: int, size: int) -> bytes:
        """``size`` bytes at guest-virtual ``address`` through vCPU ``vcpu``'s page tables (paused VM)."""
        from pyvmm.vmm import introspect

        self._require_paused("read_virtual")
        return introspect.read_virtual(self.machine, vcpu, address, size)

    def translate(self, vcpu: int, address: int) -> int | None:
        """The guest-physical address of guest-virtual ``address`` for vCPU ``vcpu`` (None: not mapped)."""
        from pyvmm.vmm import introspect

        self._require_paused("translate")
        return introspect.translate(self.machine, vcpu, address)

    def _require_paused(self, what: str) -> None:
        if not self.machine.paused:
            raise PyvmmError(f"{what}: the vCPUs are running; pause the VM first (vm.pause())")

    def start_coverage(self, path) -> None:
        """Record basic-block coverage from now on (the interpreter); ``stop_coverage`` writes it as
        drcov to ``path``. Turning it on and off around one guest command covers just that."""
        self._trace_recorder().start_coverage(path)

    def stop_coverage(self) -> int:
        """Write the coverage file; returns the number of blocks."""
        return self._trace_recorder().stop_coverage()

    def start_trace(self, path, *, limit_mib: int = 64) -> None:
        """Record every executed block (vCPU, address, size) to ``path`` from now on, at most ``limit_mib``."""
        self._trace_recorder().start_trace(path, limit_mib << 20)

    def stop_trace(self) -> dict:
        return self._trace_recorder().stop_trace()

    def _trace_recorder(self):
        if self._recorder is None:
            from pyvmm.vmm.coverage import BlockRecorder

            self._recorder = BlockRecorder(self.machine, kernel=self.config.boot.kernel)
        return self._recorder

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
        for server in self._servers:
            server.close()
        self._servers.clear()
        self.controller.close()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
