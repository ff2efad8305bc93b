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


class Delivery(enum.Enum):
    NONE = "nothing pending"
    INJECTED = "injected"
    WINDOW = "pending, the guest cannot take it now"


def deliver_pending(chip, index: int, window_open: Callable[[], bool], inject: Callable[[int], None],
                    inject_nmi: Callable[[], None]) -> Delivery:  # fmt: skip
    """Move at most one event from ``chip`` (an ``Irqchip``) into vCPU ``index``."""
    if chip.has_nmi(index) and chip.ack_nmi(index):
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
