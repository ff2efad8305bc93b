"""The userspace irqchip's state as plain data, for snapshots, and back (``pyvmm.plainstate``).

The LAPICs, IOAPIC, both 8259s and the PIT with its channels are captured as
their plain attributes; times (LAPIC timer start and due, PIT channel start) are
rebased onto the restoring chip's clock. ``restore`` writes into a freshly made
``Irqchip`` with the same vCPU count, then recomputes what is derived (the LAPIC
pages, the next timer deadline).
"""

from __future__ import annotations

from pyvmm import plainstate
from pyvmm.accel.irqchip.chip import Irqchip, IrqchipError

STATE_VERSION = 1
#: attributes holding clock() times (float or None)
TIMES = frozenset({"timer_start", "timer_due", "start"})


def save(chip: Irqchip) -> dict:
    with chip._lock:
        now = chip.clock()

        def grab(obj):
            return plainstate.capture(obj, now=now, times=TIMES)

        return {
            "version": STATE_VERSION,
            "vcpus": chip.vcpu_count,
            "lapics": [grab(lapic) for lapic in chip.lapics],
            "ioapic": grab(chip.ioapic),
            "pic": {"master": grab(chip.pic.master), "slave": grab(chip.pic.slave)},
            "pit": grab(chip.pit),
            "wait_for_sipi": list(chip._wait_for_sipi),
            "init_sipi": [list(map(list, pending)) for pending in chip._init_sipi],
            "cross_cpu_ipi": list(chip._cross_cpu_ipi),
        }


def restore(chip: Irqchip, state: dict) -> None:
    """Load ``save``'s output into ``chip`` (same vCPU count); raises ``IrqchipError`` naming a bad field."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise IrqchipError(f"irqchip state version {state.get('version') if isinstance(state, dict) else None} "
                           f"is not {STATE_VERSION}")  # fmt: skip
    if state.get("vcpus") != chip.vcpu_count:
        raise IrqchipError(f"irqchip state is for {state.get('vcpus')} vCPUs, this VM has {chip.vcpu_count}")
    with chip._lock:
        now = chip.clock()
        try:
            for i, lapic in enumerate(chip.lapics):
                plainstate.apply(lapic, state["lapics"][i], now=now, times=TIMES, where=f"lapic{i}")
            plainstate.apply(chip.ioapic, state["ioapic"], now=now, times=TIMES, where="ioapic")
            plainstate.apply(chip.pic.master, state["pic"]["master"], now=now, times=TIMES, where="pic.master")
            plainstate.apply(chip.pic.slave, state["pic"]["slave"], now=now, times=TIMES, where="pic.slave")
            plainstate.apply(chip.pit, state["pit"], now=now, times=TIMES, where="pit")
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise IrqchipError(f"irqchip state: {err}") from err
        chip._wait_for_sipi = [bool(v) for v in state["wait_for_sipi"]]
        chip._init_sipi = [[tuple(item) for item in pending] for pending in state["init_sipi"]]
        chip._cross_cpu_ipi = [bool(v) for v in state["cross_cpu_ipi"]]
        chip._refresh_pages()
        chip.timer_changed()
