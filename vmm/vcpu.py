"""The vCPU run loop: one thread per vCPU, one exit at a time.

``vcpu.run()`` returns a hypervisor-neutral exit (accel/core.py); port I/O and
MMIO go to the buses, everything else ends the loop with an ``ExitStatus``
given to the ``Lifecycle``. The loop is the VMM's hottest path: it dispatches
on the exit's type with identity checks in order of frequency, counts exits
per type with one dict update, and puts the time each I/O exit took to serve
in a histogram (vmm/latency.py, its bucket arithmetic inlined).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from time import perf_counter_ns

from pyvmm.accel.core import (Debug, EmulationFailure, Halt, InternalError, Interrupted, IoIn, IoOut, MmioRead, MmioWrite,
                              Shutdown, SystemEvent)  # fmt: skip
from pyvmm.errors import GuestError, PyvmmError
from pyvmm.vmm.bus import Bus
from pyvmm.vmm.latency import new_histogram

log = logging.getLogger("pyvmm.vcpu")


@dataclass(frozen=True)
class ExitStatus:
    """How the VM ended: the process exit status ``pyvmm boot`` uses, and why."""

    code: int
    reason: str
    error: PyvmmError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Lifecycle:
    """The VM's one-way state: running -> exit requested (first request wins) -> stopped."""

    def __init__(self):
        self._lock = threading.Lock()
        self._status: ExitStatus | None = None
        self._stop_callbacks: list = []
        self.exited = threading.Event()

    def on_stop(self, callback) -> None:
        """``callback()`` runs once when an exit is requested (e.g. kick the vCPUs)."""
        self._stop_callbacks.append(callback)

    @property
    def stopping(self) -> bool:
        return self._status is not None

    @property
    def status(self) -> ExitStatus | None:
        return self._status

    def request_exit(self, code: int, reason: str, error: PyvmmError | None = None) -> None:
        with self._lock:
            if self._status is not None:
                return
            self._status = ExitStatus(code, reason, error)
        log.info("VM exit requested: %s (status %d)", reason, code)
        for callback in self._stop_callbacks:
            callback()
        self.exited.set()

    def fail(self, error: PyvmmError) -> None:
        self.request_exit(getattr(error, "exit_status", 1) or 1, str(error), error)


class VcpuLoop:
    """Runs one vCPU until the VM stops. ``fallback`` handles EmulationFailure exits when set."""

    def __init__(self, vcpu, pio: Bus, mmio: Bus, lifecycle: Lifecycle, *, fallback=None,
                 serve_directly: bool = False):  # fmt: skip
        self.vcpu = vcpu
        #: the backend has Capability.SERVE_IO_DIRECTLY: hand it the bus dispatch
        self.serve_directly = serve_directly
        self.pio = pio
        self.mmio = mmio
        self.lifecycle = lifecycle
        self.fallback = fallback
        self.exit_counts: dict[type, int] = {}
        #: per I/O exit kind, how long serving it took (vmm/latency.py histograms, ns)
        self.exit_latency: dict[type, list[int]] = {kind: new_histogram() for kind in (IoIn, IoOut, MmioRead, MmioWrite)}
        self.thread: threading.Thread | None = None
        #: the CPUID table the vCPU was given (a snapshot keeps it)
        self.cpuid: list = []
        # pausing: the loop parks between two runs of the vCPU (an instruction boundary)
        self._gate = threading.Condition()
        self._pause_wanted = False
        self.parked = False
        #: time.perf_counter() when the loop last left the park for the guest (restore latency)
        self.resumed_at: float | None = None
        #: ``on_debug(loop, exit)`` for Debug exits while a debugger is attached (pyvmm/gdb/machine.py)
        self.on_debug = None

    def start(self, *, paused: bool = False) -> None:
        """Start the vCPU thread; with ``paused`` it parks before the guest's first instruction."""
        self._pause_wanted = paused
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.vcpu.index}", daemon=True)
        self.thread.start()

    # --- pausing (any thread) ------------------------------------------------
    def request_pause(self) -> None:
        with self._gate:
            self._pause_wanted = True
        self.vcpu.request_stop()

    def wait_parked(self, deadline: float) -> bool:
        """Wait until the loop is parked or has ended (``deadline`` on time.monotonic)."""
        with self._gate:
            while not self.parked and self.thread is not None and self.thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._gate.wait(min(remaining, 0.05))
            return True

    def release(self) -> None:
        """Let a parked (or about to park) loop run the guest again; also used to let it see a stop."""
        with self._gate:
            self._pause_wanted = False
            self._gate.notify_all()

    def _park(self) -> None:
        with self._gate:
            self.parked = True
            self._gate.notify_all()
            while self._pause_wanted and not self.lifecycle.stopping:
                self._gate.wait()
            self.parked = False
            self.resumed_at = time.perf_counter()
            self._gate.notify_all()

    def _thread_main(self) -> None:
        try:
            self.run()
        except PyvmmError as err:
            self.lifecycle.fail(err)
        except Exception as err:  # a bug in pyvmm: stop the VM and say so, with the traceback in the log
            log.exception("vcpu%d: unexpected error", self.vcpu.index)
            self.lifecycle.request_exit(70, f"internal error in pyvmm: {type(err).__name__}: {err}", PyvmmError(str(err)))

    def _serve_io(self, exit_) -> None:
        """An I/O access handled on the backend's own thread (``serve_io_directly``)."""
        started = perf_counter_ns()
        kind = type(exit_)
        counts = self.exit_counts
        counts[kind] = counts.get(kind, 0) + 1
        try:
            if kind is IoOut:
                self.pio.write(exit_.port, exit_.data)
            elif kind is IoIn:
                self.pio.read(exit_.port, exit_.data)
            elif kind is MmioWrite:
                self.mmio.write(exit_.addr, exit_.data)
            else:
                self.mmio.read(exit_.addr, exit_.data)
            took = perf_counter_ns() - started
            bits = took.bit_length()
            self.exit_latency[kind][bits << 2 | (took >> (bits - 3) & 3) if bits > 3 else bits << 2] += 1
        except PyvmmError as err:
            self.lifecycle.fail(err)
        except Exception as err:  # as in _thread_main: a bug in pyvmm stops the VM and says so
            log.exception("vcpu%d: unexpected error", self.vcpu.index)
            self.lifecycle.request_exit(70, f"internal error in pyvmm: {type(err).__name__}: {err}", PyvmmError(str(err)))

    def run(self) -> None:
        if self.serve_directly:
            self.vcpu.serve_io_directly(self._serve_io)
        vcpu_run = self.vcpu.run
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        counts = self.exit_counts
        latency = self.exit_latency
        io_in, io_out, mmio_in, mmio_out = latency[IoIn], latency[IoOut], latency[MmioRead], latency[MmioWrite]
        now = perf_counter_ns
        lifecycle = self.lifecycle
        if self._pause_wanted:
            self._park()  # vCPUs start paused; the controller resumes them
            if lifecycle.stopping:
                return
        while True:
            exit_ = vcpu_run()
            started = now()
            kind = type(exit_)
            counts[kind] = counts.get(kind, 0) + 1
            # each I/O branch ends with vmm/latency.py's bucket_of(now() - started), inlined
            if kind is IoOut:
                pio_write(exit_.port, exit_.data)
                took = now() - started
                bits = took.bit_length()
                io_out[bits << 2 | (took >> (bits - 3) & 3) if bits > 3 else bits << 2] += 1
            elif kind is IoIn:
                pio_read(exit_.port, exit_.data)
                took = now() - started
                bits = took.bit_length()
                io_in[bits << 2 | (took >> (bits - 3) & 3) if bits > 3 else bits << 2] += 1
            elif kind is MmioWrite:
                mmio_write(exit_.addr, exit_.data)
                took = now() - started
                bits = took.bit_length()
                mmio_out[bits << 2 | (took >> (bits - 3) & 3) if bits > 3 else bits << 2] += 1
            elif kind is MmioRead:
                mmio_read(exit_.addr, exit_.data)
                took = now() - started
                bits = took.bit_length()
                mmio_in[bits << 2 | (took >> (bits - 3) & 3) if bits > 3 else bits << 2] += 1
            elif kind is Interrupted:
                if lifecycle.stopping:
                    return
                if self._pause_wanted:
                    self._park()
                    if lifecycle.stopping:
                        return
            elif kind is Halt:
                # Only backends without an in-kernel LAPIC return this, and
                # they wait for the interrupt inside run(); nothing to do.
                if lifecycle.stopping:
                    return
            elif kind is EmulationFailure and self.fallback is not None:
                self.fallback(self.vcpu, exit_)
            elif kind is Debug and self.on_debug is not None:
                self.on_debug(self, exit_)  # it asks every loop to park; this one parks at its next run
            else:
                self._finish(exit_)
                return

    def _finish(self, exit_) -> None:
        index = self.vcpu.index
        kind = type(exit_)
        if kind is SystemEvent:
            if exit_.kind == "crash":
                self.lifecycle.fail(GuestError("the guest reported a crash (system event)", vcpu=index))
            else:
                self.lifecycle.request_exit(0, f"guest {exit_.kind}")
        elif kind is Shutdown:
            self.lifecycle.fail(GuestError(f"{exit_.reason} (the vCPU shut down)", rip=self._rip(), vcpu=index))
        elif kind is EmulationFailure:
            insn = exit_.insn.hex(" ") if exit_.insn else "unknown"
            self.lifecycle.fail(
                GuestError(
                    f"the hypervisor cannot emulate the instruction (bytes: {insn}) and the fallback is off",
                    rip=exit_.rip,
                    vcpu=index,
                )
            )
        elif kind is InternalError:
            detail = f": {exit_.detail}" if exit_.detail else ""
            self.lifecycle.fail(GuestError(f"{exit_.reason}{detail}", rip=exit_.rip, vcpu=index))
        else:
            self.lifecycle.fail(GuestError(f"unexpected exit {exit_!r}", vcpu=index))

    def _rip(self) -> int | None:
        try:
            return self.vcpu.get_regs().rip
        except Exception:  # state may be unreadable after a shutdown; the message stays useful without it
            return None
