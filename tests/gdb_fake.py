"""A fake ``DebugTarget`` for the gdb stub's tests, and a gdb-side packet helper.

``FakeTarget`` has a bytearray of "physical" memory, mapped at ``VIRTUAL_BASE`` for every vCPU
except the pages in ``holes``, and a few vCPUs with ``VcpuRegisters``. It runs a tiny subset of x86,
enough for gdb: nop (90), stosb (AA: [rdi] = al, rdi += 1, checked against watchpoints), int3 (CC:
a software breakpoint stop when one is set there), ``jmp rel8`` (EB xx; ``EB FE`` spins until
interrupted); any other byte counts as a one-byte instruction. Stops are reported through
``on_stop`` at once, from a thread when ``threaded`` (as a real VMM's vCPU threads would).
"""

from __future__ import annotations

import copy
import threading

from pyvmm.accel.x86 import Regs, Segment, SpecialRegs
from pyvmm.gdb.errors import DebugTargetError, UnmappedAddress
from pyvmm.gdb.stub import BreakpointKind, ResumeAction, StopEvent, StopReason
from pyvmm.gdb.target import VcpuRegisters

VIRTUAL_BASE = 0x400000
MEMORY_SIZE = 0x10000
CODE = VIRTUAL_BASE + 0x1000  # vCPU n starts at CODE + 0x100 * n
PAGE = 0x1000
RUN_LIMIT = 10000


class FakeTarget:
    def __init__(self, vcpu_count: int = 2, *, threaded: bool = False, holes: tuple[int, ...] = ()):
        self.vcpu_count = vcpu_count
        self.threaded = threaded
        self.memory = bytearray(MEMORY_SIZE)
        self.memory[0x1000:0x3000] = b"\x90" * 0x2000
        self.holes = set(holes)
        self.vcpus = [self._initial_registers(n) for n in range(vcpu_count)]
        self.breakpoints: set[tuple[BreakpointKind, int, int]] = set()
        self.max_hardware = 4  # x86 has four debug address registers
        self.on_stop = None
        self.resumes: list[dict[int, ResumeAction]] = []
        self.running = False
        self.interrupts = 0
        self.detached = self.killed = False
        #: misuses of the target by the stub (tests assert there are none)
        self.violations: list[str] = []

    @staticmethod
    def _initial_registers(n: int) -> VcpuRegisters:
        regs = Regs(rip=CODE + 0x100 * n, rsp=VIRTUAL_BASE + 0x8000 - 0x100 * n, rax=0x1111 * (n + 1),
                    rdi=VIRTUAL_BASE + 0x6000 + 0x10 * n, rflags=0x202)  # fmt: skip
        sregs = SpecialRegs(cs=Segment(selector=0x10, type=11, l=True), ss=Segment(selector=0x18),
                            ds=Segment(selector=0x18), fs=Segment(selector=0, base=0x7000_0000 + n),
                            gs=Segment(selector=0, base=0xFFFF_8880_0000_0000 + n), cr0=0x80050033,
                            cr3=0x1000, cr4=0x6A0, efer=0xD01)  # fmt: skip
        return VcpuRegisters(regs=regs, sregs=sregs, kernel_gs_base=0x1234_5678 + n)

    # -------------------------------------------------------------- memory

    def _physical(self, address: int, size: int, what: str = "guest-virtual") -> int:
        if what == "guest-virtual":
            for position in range(address - address % PAGE, address + size, PAGE):
                if position in self.holes:
                    raise UnmappedAddress(max(position, address))
            offset = address - VIRTUAL_BASE
        else:
            offset = address
        if offset < 0 or offset + size > MEMORY_SIZE:
            raise UnmappedAddress(address, what)
        return offset

    def read_virtual(self, vcpu: int, address: int, size: int) -> bytes:
        self._check_vcpu(vcpu)
        offset = self._physical(address, size)
        return bytes(self.memory[offset : offset + size])

    def write_virtual(self, vcpu: int, address: int, data: bytes) -> None:
        self._check_vcpu(vcpu)
        offset = self._physical(address, len(data))
        self.memory[offset : offset + len(data)] = data

    def read_physical(self, address: int, size: int) -> bytes:
        offset = self._physical(address, size, "guest-physical")
        return bytes(self.memory[offset : offset + size])

    def _check_vcpu(self, vcpu: int) -> None:
        # kept as well as raised: the stub turns any exception into an error reply
        if self.running:
            self.violations.append(f"vCPU {vcpu} touched while running")
        if not 0 <= vcpu < self.vcpu_count:
            self.violations.append(f"no vCPU {vcpu}")
        if self.violations:
            raise AssertionError(self.violations[-1])

    # -------------------------------------------------------------- registers

    def read_registers(self, vcpu: int) -> VcpuRegisters:
        self._check_vcpu(vcpu)
        return copy.deepcopy(self.vcpus[vcpu])

    def write_registers(self, vcpu: int, registers: VcpuRegisters) -> None:
        self._check_vcpu(vcpu)
        self.vcpus[vcpu] = registers

    # -------------------------------------------------------------- breakpoints

    def set_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        if kind != BreakpointKind.SOFTWARE:
            hardware = [b for b in self.breakpoints if b[0] != BreakpointKind.SOFTWARE]
            if len(hardware) >= self.max_hardware:
                raise DebugTargetError("no free debug register")
        self.breakpoints.add((kind, address, length))

    def remove_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        self.breakpoints.discard((kind, address, length))

    # -------------------------------------------------------------- execution

    def attach(self, on_stop) -> StopEvent:
        self.on_stop = on_stop
        return StopEvent(0, StopReason.HALTED)

    def resume(self, actions) -> None:
        if self.running or sorted(actions) != list(range(self.vcpu_count)):
            self.violations.append(f"resume({actions}) while running={self.running}")
            raise AssertionError(self.violations[-1])
        self.resumes.append(dict(actions))
        self.running = True
        stop = self._run(actions)
        if stop is not None:
            self._report(stop)

    def interrupt(self) -> None:
        self.interrupts += 1
        if self.running:
            self._report(StopEvent(0, StopReason.INTERRUPT))

    def detach(self) -> None:
        self.detached = True

    def kill(self) -> None:
        self.killed = True

    def _report(self, event: StopEvent) -> None:
        self.running = False
        if self.threaded:
            threading.Timer(0.01, self.on_stop, (event,)).start()
        else:
            self.on_stop(event)

    def _run(self, actions) -> StopEvent | None:
        stepping = [v for v, a in actions.items() if a == ResumeAction.STEP]
        if stepping:
            for vcpu in stepping:
                self._execute(vcpu)
            return StopEvent(stepping[0], StopReason.STEP)
        for vcpu, action in actions.items():
            if action != ResumeAction.CONTINUE:
                continue
            for _ in range(RUN_LIMIT):
                stop = self._check_breakpoints(vcpu)
                if stop is None:
                    spinning = self._opcode(vcpu) == b"\xeb\xfe"
                    if spinning:
                        break
                    stop = self._execute(vcpu)
                if stop is not None:
                    return stop
        return None  # every vCPU spins: running until interrupted

    def _opcode(self, vcpu: int) -> bytes:
        rip = self.vcpus[vcpu].regs.rip
        offset = rip - VIRTUAL_BASE
        return bytes(self.memory[offset : offset + 2])

    def _check_breakpoints(self, vcpu: int) -> StopEvent | None:
        regs = self.vcpus[vcpu].regs
        if (BreakpointKind.HARDWARE, regs.rip, 1) in self.breakpoints:
            return StopEvent(vcpu, StopReason.HARDWARE_BREAKPOINT)
        if self._opcode(vcpu)[:1] == b"\xcc" and (BreakpointKind.SOFTWARE, regs.rip, 1) in self.breakpoints:
            return StopEvent(vcpu, StopReason.SOFTWARE_BREAKPOINT)  # RIP at the int3, as a VMM reports it
        return None

    def _execute(self, vcpu: int) -> StopEvent | None:
        """One instruction; a watchpoint stop after it when it wrote a watched byte."""
        regs = self.vcpus[vcpu].regs
        opcode = self._opcode(vcpu)
        if opcode[:1] == b"\xaa":  # stosb
            address = regs.rdi
            self.memory[self._physical(address, 1)] = regs.rax & 0xFF
            regs.rdi += 1
            regs.rip += 1
            for kind, start, length in self.breakpoints:
                watches_writes = kind in (BreakpointKind.WRITE_WATCH, BreakpointKind.ACCESS_WATCH)
                if watches_writes and start <= address < start + length:
                    reason = StopReason.WATCH if kind == BreakpointKind.WRITE_WATCH else StopReason.ACCESS_WATCH
                    return StopEvent(vcpu, reason, address=start)
            return None
        if opcode[:1] == b"\xeb":
            regs.rip += 2 + int.from_bytes(opcode[1:2], "little", signed=True)
            return None
        regs.rip += 1
        return None


# ------------------------------------------------------------------ gdb's side of the wire


def gdb_frame(payload: bytes) -> bytes:
    """A packet as gdb sends it (escaping is the caller's: X data is passed escaped)."""
    return b"$" + payload + b"#%02x" % (sum(payload) & 0xFF)


def parse_replies(data: bytes) -> tuple[list[bytes], bytes]:
    """The packets in the stub's output (checksums checked, escapes undone) and the ack bytes.

    Written apart from the codec so that tests of the stub do not check the codec with itself.
    """
    packets, acks = [], bytearray()
    i = 0
    while i < len(data):
        c = data[i : i + 1]
        if c in (b"+", b"-"):
            acks += c
            i += 1
            continue
        assert c == b"$", f"stray output byte {c!r} at {i} in {data!r}"
        end = data.index(b"#", i)
        body = data[i + 1 : end]
        assert int(data[end + 1 : end + 3], 16) == sum(body) & 0xFF, f"bad checksum in {data[i:end+3]!r}"
        assert b"*" not in body and b"$" not in body  # gdb would read '*' as run-length encoding
        out, j = bytearray(), 0
        while j < len(body):
            if body[j] == 0x7D:
                out.append(body[j + 1] ^ 0x20)
                j += 2
            else:
                out.append(body[j])
                j += 1
        packets.append(bytes(out))
        i = end + 3
    return packets, bytes(acks)


class Session:
    """A stub on a FakeTarget, driven packet by packet as gdb would."""

    def __init__(self, target: FakeTarget | None = None, **stub_options):
        from pyvmm.gdb.stub import GdbStub

        self.target = target or FakeTarget()
        self.stops: list[StopEvent] = []
        self.stub = GdbStub(self.target, self.target.attach(self.stops.append), **stub_options)

    def send_raw(self, data: bytes) -> list[bytes]:
        self.stub.receive(data)
        while self.stops:
            self.stub.stopped(self.stops.pop(0))
        packets, _ = parse_replies(self.stub.data_to_send())
        return packets

    def request(self, payload: bytes) -> bytes:
        """The one reply to ``payload``."""
        replies = self.send_raw(gdb_frame(payload))
        assert len(replies) == 1, (payload, replies)
        return replies[0]
