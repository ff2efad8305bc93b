"""The virtio device status machine (virtio 1.2, sections 2.1 and 3.1) as an explicit table.

The driver walks ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK, each write
adding one bit; FAILED may be added at any time; writing 0 resets. The device
sets DEVICE_NEEDS_RESET itself when the driver broke a rule; any write that
does not follow the table is such a rule break.
"""

from __future__ import annotations

from enum import Enum

ACKNOWLEDGE = 0x01
DRIVER = 0x02
DRIVER_OK = 0x04
FEATURES_OK = 0x08
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# Feature bits common to every device type (virtio 1.2, section 6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32


class Step(Enum):
    RESET = "reset"
    ACKNOWLEDGE = "acknowledge"
    DRIVER = "driver"
    FEATURES_OK = "features-ok"  # the transport checks the negotiated features
    DRIVER_OK = "driver-ok"  # the transport activates the device
    FAILED = "failed"  # the driver gave up
    UNCHANGED = "unchanged"
    WRONG_ORDER = "wrong-order"


_A, _AD, _ADF, _ADFO = ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK

#: (driver-visible status now, status written) -> step. Anything absent is out of order.
TRANSITIONS: dict[tuple[int, int], Step] = {
    (0, _A): Step.ACKNOWLEDGE,
    (_A, _AD): Step.DRIVER,
    (_AD, _ADF): Step.FEATURES_OK,
    (_ADF, _ADFO): Step.DRIVER_OK,
}


def next_step(current: int, written: int) -> Step:
    """Classify a driver write of ``written`` to the Status register holding ``current``."""
    if written == 0:
        return Step.RESET
    if written & FAILED:
        return Step.FAILED
    # The driver writes back what it read, so NEEDS_RESET may be echoed; it is the device's bit.
    now, new = current & ~(DEVICE_NEEDS_RESET | FAILED), written & ~DEVICE_NEEDS_RESET
    if current & (DEVICE_NEEDS_RESET | FAILED):
        return Step.UNCHANGED if new == now else Step.WRONG_ORDER
    if new == now:
        return Step.UNCHANGED
    return TRANSITIONS.get((now, new), Step.WRONG_ORDER)


def features_problem(offered: int, accepted: int) -> str | None:
    """Why FEATURES_OK must be refused for ``accepted``, or None when it is acceptable."""
    extra = accepted & ~offered
    if extra:
        bits = ", ".join(str(bit) for bit in range(64) if extra >> bit & 1)
        return f"driver accepted feature bits the device did not offer ({bits})"
    if not accepted >> VIRTIO_F_VERSION_1 & 1:
        return "driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
    return None
