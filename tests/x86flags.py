"""Which RFLAGS bits an instruction leaves architecturally undefined (Intel SDM vol. 2, "Flags Affected").

Differential tests compare two CPUs (KVM's emulator runs flag computations on
the host CPU, whose vendor varies; the interpreter computes them in software):
only defined state may be compared. ``defined_flags(value, last_writer)`` masks
what the instruction that last wrote the flags left undefined.
"""

CF, PF, AF, ZF, SF, OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11

#: mnemonic (with a qualifier where the rule depends on the operands) -> undefined flags
UNDEFINED = {
    "shift by 1": AF,  # SHL/SHR/SAR: "the AF flag is undefined for a non-zero count"
    "shift by more than 1": AF | OF,  # "... OF is affected only for 1-bit shifts; otherwise undefined"
    "and": AF, "or": AF, "xor": AF, "test": AF,  # "the state of the AF flag is undefined"
    "mul": SF | ZF | AF | PF, "imul": SF | ZF | AF | PF,
    "bsf": CF | OF | SF | AF | PF, "bsr": CF | OF | SF | AF | PF,
    "popcnt": 0,  # OF SF ZF AF CF PF are cleared, ZF set from the source: all defined
    "add": 0, "sub": 0, "cmp": 0, "inc": 0, "dec": 0,
}  # fmt: skip


def defined_flags(value: int, last_writer: str) -> int:
    """``value`` (an RFLAGS image) with the bits ``last_writer`` leaves undefined cleared."""
    return value & ~UNDEFINED[last_writer]
