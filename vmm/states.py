"""The VM's lifecycle as data: states, the actions between them, and the events each transition emits.

Sans-IO (h11's style): ``VmStates`` only says whether an action is allowed in the
current state and what follows; it starts no thread and touches no vCPU. The
controller (``vmm/controller.py``) asks it first, does the work, then records the
transition, so the CLI, the embedding API and the API server all obey one table.

    Created -> Configured -> Running <-> Paused -> Stopped

A snapshot is taken only while Paused (Firecracker's rule) and leaves the VM
Paused. Stopped is final; it records why (the guest's reset, a signal, an error).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

from pyvmm.errors import PyvmmError


class VmState(enum.Enum):
    CREATED = "Created"
    CONFIGURED = "Configured"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPED = "Stopped"


S = VmState
#: (state, action) -> (next state, event kind)
TRANSITIONS: dict[tuple[VmState, str], tuple[VmState, str]] = {
    (S.CREATED, "configure"): (S.CONFIGURED, "configured"),
    (S.CONFIGURED, "configure"): (S.CONFIGURED, "configured"),
    (S.CONFIGURED, "start"): (S.RUNNING, "started"),
    (S.CONFIGURED, "restore"): (S.PAUSED, "restored"),
    (S.RUNNING, "pause"): (S.PAUSED, "paused"),
    (S.PAUSED, "resume"): (S.RUNNING, "resumed"),
    (S.PAUSED, "snapshot"): (S.PAUSED, "snapshot-created"),
    **{(state, "stop"): (S.STOPPED, "stopped") for state in (S.CREATED, S.CONFIGURED, S.RUNNING, S.PAUSED)},
}
ACTIONS = tuple(sorted({action for _, action in TRANSITIONS}))


class TransitionError(PyvmmError):
    """An action the current state does not allow (pause while not running, ...)."""

    def __init__(self, action: str, state: VmState):
        self.action, self.state = action, state
        allowed = sorted(a for (s, a) in TRANSITIONS if s is state)
        super().__init__(f"cannot {action} the VM: it is {state.value}"
                         + (f" (allowed: {', '.join(allowed)})" if allowed else ""))  # fmt: skip


@dataclass(frozen=True)
class VmEvent:
    """One transition: its kind (``started``, ``paused``, ...), the state after it, when, and why."""

    kind: str
    state: VmState
    time: float
    reason: str = ""
    detail: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        out = {"event": self.kind, "state": self.state.value, "time": round(self.time, 6)}
        if self.reason:
            out["reason"] = self.reason
        if self.detail:
            out["detail"] = self.detail
        return out


class VmStates:
    """The current state and the table; ``record(action)`` moves on and returns the event."""

    def __init__(self, clock=time.time):
        self.state = VmState.CREATED
        self.clock = clock
        self._lock = threading.Lock()

    def allows(self, action: str) -> bool:
        return (self.state, action) in TRANSITIONS

    def check(self, action: str) -> None:
        """Raise ``TransitionError`` unless ``action`` is allowed now."""
        if action not in ACTIONS:
            raise ValueError(f"unknown lifecycle action {action!r}; actions: {', '.join(ACTIONS)}")
        if not self.allows(action):
            raise TransitionError(action, self.state)

    def record(self, action: str, reason: str = "", **detail) -> VmEvent:
        with self._lock:
            self.check(action)
            self.state, kind = TRANSITIONS[(self.state, action)]
            return VmEvent(kind, self.state, self.clock(), reason, detail)
