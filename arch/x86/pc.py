"""The PC platform's fixed addresses and ports that interrupt controllers and timers use."""

LAPIC_BASE = 0xFEE0_0000  # the local APIC page after reset (IA32_APIC_BASE)
IOAPIC_BASE = 0xFEC0_0000
PAGE_SIZE = 0x1000

#: ports of the 8259 pair, the 8254 PIT (with the speaker/gate port) and the ELCR
PIC_PORTS = (0x20, 0x21, 0xA0, 0xA1)
PIT_PORTS = (0x40, 0x41, 0x42, 0x43)
PORT_SYSTEM_CONTROL_B = 0x61
ELCR_PORTS = (0x4D0, 0x4D1)
IRQCHIP_PORTS = frozenset((*PIC_PORTS, *PIT_PORTS, PORT_SYSTEM_CONTROL_B, *ELCR_PORTS))
