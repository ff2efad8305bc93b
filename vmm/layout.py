"""Every fixed guest-physical address pyvmm uses, in one place (x86_64 PC layout).

Low memory (below 1 MiB) holds the boot structures the loaders write; RAM
above ``MMIO_GAP_START`` is moved above 4 GiB so the 32-bit MMIO hole stays
free for the IOAPIC, LAPIC and virtio-mmio windows.
"""

from pyvmm.arch.x86 import pc

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- low memory boot structures ------------------------------------------
BOOT_GDT = 0x500  # GDT used for the 32-bit PVH and 64-bit Linux entries
BOOT_IDT = 0x520  # an empty IDT (limit 0) so early faults triple-fault visibly
PVH_START_INFO = 0x6000  # struct hvm_start_info
PVH_MODLIST = 0x6040  # struct hvm_modlist_entry[] (the initrd)
PVH_MEMMAP = 0x6100  # struct hvm_memmap_table_entry[]
PVH_MEMMAP_MAX_ENTRIES = (0x7000 - PVH_MEMMAP) // 24
ZERO_PAGE = 0x7000  # struct boot_params for the Linux boot protocol
BOOT_STACK_TOP = 0x8FF0
PML4 = 0x9000  # identity page tables for the 64-bit entry
PDPT = 0xA000
PD = 0xB000  # 4 page directories of 2 MiB pages map the low 4 GiB
PD_COUNT = 4
AP_TRAMPOLINE_MAX = 0x9F000  # guests place their SIPI trampoline below this (4 KiB aligned)
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000  # bytes including the NUL
EBDA_START = 0x9FC00  # the MP table lives here (searched by Linux)
LOW_RAM_END = 0xA0000  # VGA hole / BIOS area up to 1 MiB is reserved in the e820 map
HIGH_MEMORY = 0x100000  # where protected-mode kernels load
# Low memory a multiboot kernel may load into (kvm-unit-tests' realmode test loads at 0x8000): what a
# multiboot boot leaves free between the GDT and info structure, the command line, and the EBDA.
MULTIBOOT_LOW_ZONES = ((0x8000, CMDLINE), (CMDLINE + CMDLINE_MAX, EBDA_START))

# --- the 32-bit MMIO hole ------------------------------------------------
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000
VIRTIO_MMIO_BASE = 0xD000_0000  # one 4 KiB window per virtio device
VIRTIO_MMIO_SIZE = 0x1000
IOAPIC_BASE = pc.IOAPIC_BASE
LAPIC_BASE = pc.LAPIC_BASE

# --- interrupt lines (ISA IRQ = IOAPIC pin) ------------------------------
IRQ_PIT = 0
IRQ_KEYBOARD = 1
IRQ_COM2 = 3
IRQ_COM1 = 4
IRQ_RTC = 8
IOAPIC_PINS = 24
# virtio devices take the IOAPIC-only GSIs 16-23: level-triggered, active-high
# (declared so in the DSDT), with no ISA edge-triggered defaults to override.
VIRTIO_GSIS = tuple(range(16, IOAPIC_PINS))

# --- port I/O ------------------------------------------------------------
PORT_COM1 = 0x3F8
PORT_I8042 = 0x60  # data; command/status at 0x64
PORT_CMOS = 0x70
PORT_POST = 0x80  # boot-progress marker
PORT_DEBUG_EXIT = 0xF4


def ram_layout(memory_size: int) -> list[tuple[int, int]]:
    """Guest RAM regions ``(guest_addr, size)`` for ``memory_size`` bytes of RAM."""
    if memory_size <= MMIO_GAP_START:
        return [(0, memory_size)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, memory_size - MMIO_GAP_START)]


def virtio_irqs():
    """Interrupt lines (GSIs) for virtio-mmio devices, in order."""
    return list(VIRTIO_GSIS)
