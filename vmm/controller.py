"""The VM controller: one VM's lifecycle (``vmm/states.py``) driven over a built ``Machine``.

The CLI, the embedding API (``pyvmm.api.VM``) and the API server are thin clients
of it. It checks each action against the lifecycle table, does the work, then
records the transition and hands the event to every subscriber: callbacks, the
``events()`` iterators and the JSON-lines journal file.

vCPUs start paused and are resumed once everything is wired (Firecracker's
order). ``pause()`` stops every vCPU at an instruction boundary and then holds
the device event loop after the work already queued on it (so a virtio request
the guest submitted completes, and no device runs while paused); ``resume()``
releases them in the reverse order. When the guest ends the VM (reset, a crash,
an error), the controller records the stop with the machine's reason.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.vmm.states import TransitionError, VmEvent, VmState, VmStates

log = logging.getLogger("pyvmm.controller")

PAUSE_TIMEOUT = 10.0  # s a vCPU may take to reach an instruction boundary
_END = object()


class ControllerError(PyvmmError):
    """The controller could not do what was asked (a vCPU did not pause in time, ...)."""


class VmController:
    def __init__(self, *, journal: str | Path | None = None, clock=time.time):
        self.states = VmStates(clock)
        self.config = None
        self.machine = None
        self._build = None
        self._lock = threading.RLock()
        self._callbacks: list = []
        self._queues: list[queue.SimpleQueue] = []
        self._journal = open(journal, "a", encoding="utf-8") if journal is not None else None  # noqa: SIM115
        self.history: list[VmEvent] = []
        #: the memory files the last snapshot (taken or restored) consists of, for a Diff on top
        self._memory_chain: list[dict] | None = None

    @property
    def state(self) -> VmState:
        return self.states.state

    # --- events ------------------------------------------------------------------------
    def subscribe(self, callback) -> None:
        """``callback(event)`` for every transition from now on (on the thread that made it)."""
        self._callbacks.append(callback)

    def events(self, timeout: float | None = None):
        """An iterator over the transitions from now on; it ends after ``stopped`` (or on ``timeout``)."""
        feed: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._queues.append(feed)
            if self.state is VmState.STOPPED:
                feed.put(_END)
        while True:
            try:
                item = feed.get(timeout=timeout)
            except queue.Empty:
                return
            if item is _END:
                return
            yield item
            if item.state is VmState.STOPPED:
                return

    def _emit(self, event: VmEvent) -> None:
        self.history.append(event)
        log.info("VM %s%s", event.kind, f": {event.reason}" if event.reason else "")
        if self._journal is not None:
            self._journal.write(json.dumps(event.as_json()) + "\n")
            self._journal.flush()
        for feed in list(self._queues):
            feed.put(event)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:  # a subscriber's bug must not stop the VM
                log.exception("lifecycle subscriber failed on %s", event.kind)

    def _record(self, action: str, reason: str = "", **detail) -> VmEvent:
        event = self.states.record(action, reason, **detail)
        self._emit(event)
        return event

    # --- the actions ---------------------------------------------------------------------
    def configure(self, config, **build_options) -> None:
        """Set (or replace, before start) the VM's configuration; ``build_options`` go to the builder."""
        with self._lock:
            self.states.check("configure")
            self.config, self._build = config, build_options
            self._record("configure")

    def build(self):
        """Build the machine for the configuration (once); its vCPUs do not run until ``start``."""
        with self._lock:
            if self.machine is None:
                if self.config is None:
                    self.states.check("start")  # names the state: nothing configured yet
                from pyvmm.vmm.builder import build_machine

                self.machine = build_machine(self.config, **(self._build or {}))
                self.machine.lifecycle.on_stop(self._machine_stopped)
            return self.machine

    def start(self, *, hold: bool = False) -> None:
        """Start the devices and the vCPUs (paused), then resume them: Configured -> Running. With
        ``hold`` the vCPUs stay before the guest's first instruction for a debugger to release."""
        with self._lock:
            self.states.check("start")
            machine = self.build()
            machine.start(paused=True)
            if not hold:
                machine.resume()
            # "held" only when it is: the started event of an ordinary start keeps its shape
            self._record("start", accel=machine.accel, vcpus=len(machine.loops), **({"held": True} if hold else {}))

    def pause(self) -> None:
        with self._lock:
            self.states.check("pause")
            started = time.monotonic()
            if not self.machine.pause(PAUSE_TIMEOUT):
                self.machine.resume()
                raise ControllerError(f"a vCPU did not reach an instruction boundary within {PAUSE_TIMEOUT:.0f} s; "
                                      "the VM keeps running")  # fmt: skip
            self._record("pause", seconds=round(time.monotonic() - started, 6))

    def resume(self) -> None:
        with self._lock:
            self.states.check("resume")
            self.machine.resume()
            self._record("resume")

    # --- snapshots -------------------------------------------------------------------------
    def snapshot(self, snapshot_path, mem_path, *, diff: bool = False) -> dict:
        """Write the paused VM's state and memory (Firecracker's rule: only while Paused)."""
        from pyvmm.vmm import snapshot as vmsnapshot

        with self._lock:
            self.states.check("snapshot")
            if diff and self._memory_chain is None:
                raise ControllerError("a Diff snapshot needs an earlier snapshot of this VM (take a Full one first)")
            figures = vmsnapshot.create(self.machine, self.config, snapshot_path, mem_path,
                                        base_chain=self._memory_chain if diff else None)  # fmt: skip
            self._memory_chain = figures.pop("chain")
            self._record("snapshot", path=str(snapshot_path), mem_path=str(mem_path), diff=diff, **figures)
            return figures

    def restore(self, snapshot_path, mem_path, *, accel: list[str] | None = None, resume: bool = False,
                track_dirty_pages: bool | None = None, **build_options) -> None:  # fmt: skip
        """Build the machine of a snapshot (Created -> Configured -> Paused), optionally resuming it.
        ``track_dirty_pages`` (Firecracker's load option) overrides what the snapshotted VM had."""
        from pyvmm.accel.registry import AUTO_ORDER
        from pyvmm.vmm import snapshot as vmsnapshot
        from pyvmm.vmm.builder import build_machine

        source = str(snapshot_path)
        state = vmsnapshot.read_state_file(snapshot_path)
        config = vmsnapshot.config_from_data(state["config"], accel or list(AUTO_ORDER), source)
        if track_dirty_pages is not None:
            config.machine.track_dirty_pages = track_dirty_pages
        with self._lock:
            if self.state is VmState.CREATED:
                self.configure(config, **build_options)
            self.states.check("restore")
            self.config = config
            started = time.monotonic()
            self.machine = build_machine(config, snapshot=(state, mem_path, source), **(self._build or {}))
            saved = state["memory"]
            self._memory_chain = [*saved.get("base_chain", []),
                                  {"file": str(Path(mem_path).resolve()), "ranges": saved.get("ranges")}]  # fmt: skip
            self.machine.lifecycle.on_stop(self._machine_stopped)
            self.machine.start(paused=True)
            if not self.machine.pause(PAUSE_TIMEOUT):
                raise ControllerError("the restored vCPUs did not come up paused")
            self._record("restore", path=source, accel=self.machine.accel, from_backend=state.get("backend"),
                         seconds=round(time.monotonic() - started, 6))  # fmt: skip
        if resume:
            self.resume()

    def stop(self, reason: str = "stopped by the host", code: int = 0):
        """End the VM (any state but Stopped); returns the machine's exit status when it ran."""
        with self._lock:
            if self.state is VmState.STOPPED:
                return self.machine.lifecycle.status if self.machine else None
            if self.machine is not None and self.machine._started:
                return self.machine.stop(reason, code)  # _machine_stopped records the transition
            self._record("stop", reason)
            return None

    def _machine_stopped(self) -> None:
        """The machine's exit was requested (by the guest, a device, an error or ``stop``)."""
        status = self.machine.lifecycle.status
        # not under the controller's lock: a vCPU thread runs this, and pause() may hold the lock
        # while it waits for that vCPU
        try:
            self._record("stop", status.reason, code=status.code)
        except TransitionError:
            pass  # already stopped
        self.machine.release_paused()

    def wait(self, timeout: float | None = None):
        machine = self.machine
        return None if machine is None else machine.wait(timeout)

    def close(self) -> None:
        with self._lock:
            if self.machine is not None:
                self.machine.close()
            if self.state is not VmState.STOPPED:
                self._record("stop", "closed")
            if self._journal is not None:
                self._journal.close()
                self._journal = None
