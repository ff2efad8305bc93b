"""A paused machine's vCPUs and memory as a debugger sees them, on every backend.

Guest-virtual addresses go through the vCPU's own page tables (``arch/x86/paging.py``, read from
guest RAM: no accessed/dirty bits set, no permission checks); guest-physical ones must lie in guest
RAM. ``AddressError`` names the first address with nothing behind it. The embedding API
(``VM.read_virtual`` and friends) and the gdb stub's target use these.
"""

from __future__ import annotations

from pyvmm.arch.x86 import paging
from pyvmm.errors import PyvmmError

PAGE = 0x1000


class AddressError(PyvmmError):
    """A guest address with nothing behind it."""

    def __init__(self, address: int, what: str = "guest-virtual"):
        self.address = address
        super().__init__(f"{what} address {address:#x} is not mapped")


def vcpu_of(machine, index: int):
    if not 0 <= index < len(machine.loops):
        raise PyvmmError(f"there is no vCPU {index} (this VM has {len(machine.loops)})")
    return machine.loops[index].vcpu


def translate(machine, vcpu: int, address: int) -> int | None:
    """The guest-physical address of guest-virtual ``address`` for ``vcpu`` (None: not mapped)."""
    sregs = vcpu_of(machine, vcpu).get_sregs()
    memory = machine.memory

    def read_phys(at: int, size: int) -> int | None:
        return memory.read_int(at, size) if memory.contains(at, size) else None

    return paging.translate(read_phys, address, cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer)


def physical_pieces(machine, vcpu: int, address: int, size: int) -> list[tuple[int, int]]:
    """``[address, address+size)`` as (guest-physical address, length) per page; all mapped or AddressError."""
    memory, pieces = machine.memory, []
    while size > 0:
        length = min(size, PAGE - (address & (PAGE - 1)))
        physical = translate(machine, vcpu, address)
        if physical is None or not memory.contains(physical, length):
            raise AddressError(address)
        pieces.append((physical, length))
        address, size = address + length, size - length
    return pieces


def read_virtual(machine, vcpu: int, address: int, size: int) -> bytes:
    return b"".join(machine.memory.read(physical, length) for physical, length in physical_pieces(machine, vcpu, address, size))


def write_virtual(machine, vcpu: int, address: int, data: bytes) -> None:
    """Write through ``vcpu``'s page tables, regardless of page protection; nothing is written unless
    every byte is mapped."""
    offset = 0
    for physical, length in physical_pieces(machine, vcpu, address, len(data)):
        machine.memory.write(physical, data[offset : offset + length])
        offset += length


def read_physical(machine, address: int, size: int) -> bytes:
    if size < 0 or not machine.memory.contains(address, size):
        raise AddressError(address, "guest-physical")
    return machine.memory.read(address, size)
