"""KVM's in-kernel interrupt controllers and PIT <-> pyvmm's userspace ones, for cross-backend snapshots.

KVM gives its devices as raw structures (<linux/kvm.h>: ``kvm_pic_state``,
``kvm_ioapic_state``, ``kvm_pit_state2``, and per vCPU the LAPIC register page of
``kvm_lapic_state``); ``accel/kvm.py`` saves them as bytes. Here they are read
into, or made from, a live ``Irqchip``:

* the 8259s and the IOAPIC map field for field (KVM's ``irr`` of the IOAPIC is
  the asserted pins, pyvmm's ``inputs``);
* a LAPIC page maps register by register; the timer keeps its current count (a
  one-shot due in 3 ms is due 3 ms after the restore). KVM restarts a timer from
  its initial count when a page is loaded: the conversion to KVM loses the part
  of a period already elapsed;
* a PIT channel keeps its mode, count and when it was loaded (``count_load_time``
  is host CLOCK_MONOTONIC nanoseconds; the save records the clock to rebase it).
  A latched but unread count or status is dropped.
"""

from __future__ import annotations

import struct
import time

from pyvmm.accel.irqchip.chip import Irqchip, IrqchipError
from pyvmm.accel.irqchip.lapic import (
    LVT_OFFSETS, LVT_TIMER, LVT_TIMER_PERIODIC, REG_DFR, REG_ESR, REG_ICR_HIGH, REG_ICR_LOW, REG_ID, REG_IRR, REG_ISR,
    REG_LDR, REG_SVR, REG_TIMER_CURRENT, REG_TIMER_DIVIDE, REG_TIMER_INITIAL, REG_TMR, REG_TPR,
)
from pyvmm.accel.irqchip.pit import PIT_HZ

#: kvm_pic_state, 16 bytes in this order -> pyvmm's Pic8259 attributes
PIC_FIELDS = (("last_irr", "last_irr"), ("irr", "irr"), ("imr", "imr"), ("isr", "isr"), ("priority_add", "priority_add"),
              ("irq_base", "irq_base"), ("read_reg_select", "read_isr"), ("poll", "poll"),
              ("special_mask", "special_mask"), ("init_state", "init_state"), ("auto_eoi", "auto_eoi"),
              ("rotate_on_auto_eoi", "rotate_on_auto_eoi"), ("special_fully_nested_mode", "special_fully_nested"),
              ("init4", "init4"), ("elcr", "elcr"), ("elcr_mask", "elcr_writable"))  # fmt: skip
IOAPIC = struct.Struct("<QIIII24Q")  # base_address, ioregsel, id, irr, pad, redirtbl[24]
PIT_CHANNEL = struct.Struct("<IHBBBBBBBBBBq")  # count .. gate, count_load_time (24 bytes)
IRQCHIP_HEADER = 8  # kvm_irqchip: chip_id, pad, then the 512-byte union
RW_STATE_WORD0, RW_STATE_WORD1 = 3, 4  # KVM's PIT read/write states for 16-bit access
LAPIC_PAGE = 1024


def _u32(page: bytes, offset: int) -> int:
    return struct.unpack_from("<I", page, offset)[0]


def _bank(page: bytes, base: int) -> int:
    return sum(_u32(page, base + 16 * i) << (32 * i) for i in range(8))


# --------------------------------------------------------------------------------- KVM -> userspace
def load_from_kvm(chip: Irqchip, platform: dict, lapic_pages: list[bytes | None]) -> None:
    """Set ``chip`` (fresh, same vCPU count) from KVM's saved device state and the vCPUs' LAPIC pages."""
    try:
        raw = {name: bytes.fromhex(platform["irqchip"][name]) for name in ("pic_master", "pic_slave", "ioapic")}
        pit_raw = bytes.fromhex(platform["pit2"])
        age_base = platform["ktime_ns"]
    except (KeyError, ValueError, TypeError) as err:
        raise IrqchipError(f"KVM device state in the snapshot: {err}") from err
    with chip._lock:
        now = chip.clock()
        for name, pic in (("pic_master", chip.pic.master), ("pic_slave", chip.pic.slave)):
            values = raw[name][IRQCHIP_HEADER : IRQCHIP_HEADER + len(PIC_FIELDS)]
            for (_, ours), value in zip(PIC_FIELDS, values):
                setattr(pic, ours, bool(value) if isinstance(getattr(pic, ours), bool) else value)
        _base, select, ioapic_id, irr, _pad, *table = IOAPIC.unpack_from(raw["ioapic"], IRQCHIP_HEADER)
        chip.ioapic.select, chip.ioapic.id, chip.ioapic.inputs = select, ioapic_id, irr
        chip.ioapic.redirection = list(table[: len(chip.ioapic.redirection)])
        for i, channel in enumerate(chip.pit.channels):
            fields = PIT_CHANNEL.unpack_from(pit_raw, i * PIT_CHANNEL.size)
            count, _latched, _count_latched, _status_latched, _status, read_state, write_state, _write_latch, \
                rw_mode, mode, bcd, gate, load_time = fields
            channel.mode, channel.bcd, channel.gate, channel.rw_mode = mode, bool(bcd), bool(gate), rw_mode or 3
            channel.reload = count or 0x10000
            channel.read_msb_next = read_state == RW_STATE_WORD1
            channel.write_msb_next = write_state == RW_STATE_WORD1
            channel.latched, channel.status_latched = [], None
            if count and load_time:
                age = max(0.0, (age_base - load_time) / 1e9)
                channel.start, channel.loaded, channel.null_count = now - age, True, False
                ticks = int(age * PIT_HZ)
                channel.edges_done = ticks // channel.reload if mode in (2, 3) else int(ticks >= channel.reload)
            else:
                channel.start, channel.loaded = None, False
        for lapic, page in zip(chip.lapics, lapic_pages):
            if page is None:
                raise IrqchipError(f"vCPU {lapic.index} has no LAPIC page in the snapshot")
            _lapic_from_page(lapic, page, now)
        chip._refresh_pages()
        chip.timer_changed()


def _lapic_from_page(lapic, page: bytes, now: float) -> None:
    lapic.apic_id = _u32(page, REG_ID) >> 24
    lapic.tpr = _u32(page, REG_TPR) & 0xFF
    lapic.ldr, lapic.dfr, lapic.svr = _u32(page, REG_LDR), _u32(page, REG_DFR), _u32(page, REG_SVR) & 0x3FF
    lapic.isr, lapic.tmr, lapic.irr = _bank(page, REG_ISR), _bank(page, REG_TMR), _bank(page, REG_IRR)
    lapic.esr, lapic.esr_pending = _u32(page, REG_ESR), 0
    lapic.icr_low, lapic.icr_high = _u32(page, REG_ICR_LOW), _u32(page, REG_ICR_HIGH)
    lapic.lvt = [_u32(page, offset) for offset in LVT_OFFSETS]
    lapic.timer_divide = _u32(page, REG_TIMER_DIVIDE) & 0xB
    lapic.timer_initial = _u32(page, REG_TIMER_INITIAL)
    current = _u32(page, REG_TIMER_CURRENT)
    lapic.timer_backlog = 0
    if lapic.timer_initial and (current or lapic.lvt[LVT_TIMER] & LVT_TIMER_PERIODIC):
        lapic.timer_start, lapic.timer_base_ticks = now, lapic.timer_initial - current
    else:
        lapic.timer_start, lapic.timer_base_ticks = None, 0
    lapic._timer_rearm(now)


# --------------------------------------------------------------------------------- userspace -> KVM
def to_kvm(chip: Irqchip) -> tuple[dict, list[bytes]]:
    """(KVM's device state as ``KvmVm.restore_platform_state`` takes it, a LAPIC page per vCPU)."""
    with chip._lock:
        now = chip.clock()
        ktime = time.monotonic_ns()
        chips = {}
        for name, chip_id, pic in (("pic_master", 0, chip.pic.master), ("pic_slave", 1, chip.pic.slave)):
            body = bytes(int(getattr(pic, ours)) & 0xFF for _, ours in PIC_FIELDS)
            chips[name] = _irqchip_blob(chip_id, body)
        ioapic = chip.ioapic
        table = list(ioapic.redirection) + [1 << 16] * (24 - len(ioapic.redirection))
        chips["ioapic"] = _irqchip_blob(2, IOAPIC.pack(0xFEC00000, ioapic.select, ioapic.id, ioapic.inputs, 0, *table[:24]))
        pit = bytearray()
        for channel in chip.pit.channels:
            load_time = ktime - int((now - channel.start) * 1e9) if channel.start is not None else 0
            state = RW_STATE_WORD0 if channel.rw_mode == 3 else channel.rw_mode
            pit += PIT_CHANNEL.pack(channel.reload if channel.loaded else 0, 0, 0, 0, 0, state, state, 0,
                                    channel.rw_mode, channel.mode, int(channel.bcd), int(channel.gate), load_time)  # fmt: skip
        pit += struct.pack("<I9I", 0, *([0] * 9))
        pages = [_page_of(lapic, now) for lapic in chip.lapics]
    return {"kind": "kvm", "irqchip": chips, "pit2": bytes(pit).hex(), "clock": 0, "ktime_ns": ktime}, pages


def _irqchip_blob(chip_id: int, body: bytes) -> str:
    return (struct.pack("<II", chip_id, 0) + body.ljust(512, b"\0")).hex()


def _page_of(lapic, now: float) -> bytes:
    page = bytearray(LAPIC_PAGE)
    for offset in range(0, LAPIC_PAGE, 16):
        struct.pack_into("<I", page, offset, lapic.read(offset, now) & 0xFFFFFFFF)
    return bytes(page)

