"""Taking interrupts from the userspace irqchip into a vCPU, the same way for every backend that uses it.

At each instruction boundary where the backend regains control (before it runs
the guest again) it calls ``deliver_pending``: an NMI goes in at once, a
pending interrupt goes in when the guest can take it (IF = 1, no interrupt
shadow), and otherwise the backend must look again when that changes (an
interrupt-window exit where the hypervisor has one; the interpreter retries
after a delay).
"""

from __future__ import annotations

import enum
from typing import Callable

#: a timer deadline still in the past after poll() is retried this often (s), never spun on or dropped
STALE_DEADLINE_RETRY = 0.001


class Delivery(enum.Enum):
    NONE = "nothing pending"
    INJECTED = "injected"
    WINDOW = "pending, the guest cannot take it now"


def deliver_pending(chip, index: int, window_open: Callable[[], bool], inject: Callable[[int], None],
                    inject_nmi: Callable[[], None], nmi_blocked: Callable[[], bool] | None = None) -> Delivery:  # fmt: skip
    """Move at most one event from ``chip`` (an ``Irqchip``) into vCPU ``index``. ``nmi_blocked``:
    the backend tracks NMI blocking (from an NMI's delivery to the next IRET): a pending NMI waits."""
    if chip.has_nmi(index) and not (nmi_blocked and nmi_blocked()) and chip.ack_nmi(index):
        inject_nmi()
        return Delivery.INJECTED
    if not chip.has_interrupt(index):
        return Delivery.NONE
    if not window_open():
        return Delivery.WINDOW
    vector = chip.ack_interrupt(index)  # None: withdrawn meanwhile (a level line fell)
    if vector is not None:
        inject(vector)
    return Delivery.INJECTED


class HaltWait:
    """``hlt`` and wait-for-SIPI of one vCPU on the userspace irqchip, the same way for every backend.

    ``wait`` blocks until ``woken()`` or the vCPU's next timer deadline and never
    spins: a deadline already in the past returns at once the first time (the
    backend then polls the chip); if poll() left it in the past, it is retried no
    more often than every ``STALE_DEADLINE_RETRY`` rather than ignored, so a
    timer can never be lost.
    """

    def __init__(self, chip, index: int):
        self._chip, self._index = chip, index
        self._stale_due: float | None = None

    def wait(self, cond, woken: Callable[[], bool], *, timers: bool = True) -> None:
        """With ``cond`` (a Condition) held; ``timers`` False: wait for ``woken()`` only (wait-for-SIPI)."""
        chip = self._chip
        while not woken():
            due = chip.next_deadline(self._index) if timers else None
            timeout = None
            if due is not None:
                timeout = due - chip.clock()
                if timeout <= 0:
                    if due != self._stale_due:
                        self._stale_due = due
                        return
                    timeout = STALE_DEADLINE_RETRY
                    self._stale_due = None  # after this wait, poll again
            cond.wait(timeout)
            if due is not None and not woken() and due - chip.clock() <= 0:
                return
