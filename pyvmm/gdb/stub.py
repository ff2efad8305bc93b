"""The gdb remote protocol session, sans-IO, over an abstract ``DebugTarget`` (gdb manual, "Remote
Protocol": Packets, Stop Reply Packets, General Query Packets).

``GdbStub`` takes gdb's bytes (``receive``) and the target's stop reports (``stopped``) and has bytes
for gdb (``data_to_send``); it calls the target for everything else. It is all-stop: a stop reported
for one vCPU means the target stopped every vCPU; the stop reply names the thread that caused it.
gdb's threads are the vCPUs, thread id ``n + 1`` for vCPU ``n``.

Software breakpoints (Z0) belong to the stub: it reads the original byte through the target, writes
int3 (0xCC) in its place, and keeps the original byte. Memory reads (m) show the original bytes,
and writes (M, X) over a breakpoint change the kept byte and leave the int3 in guest memory, so
breakpoints are invisible to gdb. The target is told of each one (``set_breakpoint(SOFTWARE, ...)``)
so it can stop on that int3 (and give the guest its own int3s); it must report RIP at the int3,
not after it. The address is guest-virtual in the selected (Hg) vCPU's address space at the time of
Z0. Detaching, killing and losing the connection take every breakpoint out again. A guest that
rewrites a breakpoint's byte itself keeps what it wrote: z0 restores only where int3 still is.

Every request gets a reply (or, for a resume, a stop reply later); bad input of any kind - a
malformed packet, an unknown register or thread, an unmapped address, a target's refusal - is an
``E xx`` reply and the session goes on.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pyvmm.errors import PyvmmError
from pyvmm.gdb import target as regfile
from pyvmm.gdb.errors import DebugTargetError, GdbError, UnmappedAddress
from pyvmm.gdb.packets import PACKET_SIZE, Interrupt, OversizedPacket, Packet, RspCodec
from pyvmm.gdb.target import TARGET_DESCRIPTION, VcpuRegisters

log = logging.getLogger("pyvmm.gdb")

INT3 = 0xCC
PAGE_SIZE = 0x1000
ADDRESS_LIMIT = 1 << 64

# error replies (errno values, as gdbserver uses them)
E_IO = b"E05"  # the target failed
E_FAULT = b"E0e"  # unmapped memory
E_BUSY = b"E10"  # a request while the vCPUs run
E_INVALID = b"E16"  # a malformed request, an unknown register or thread
E_TOO_BIG = b"E07"  # longer than this stub takes
E_XFER = b"E00"  # qXfer: malformed, or an annex that does not exist

SIGINT, SIGTRAP = 2, 5


class BreakpointKind(enum.IntEnum):
    """The Z/z packet types."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE_WATCH = 2
    READ_WATCH = 3
    ACCESS_WATCH = 4


class ResumeAction(enum.Enum):
    CONTINUE = "c"
    STEP = "s"  # one instruction, then a STEP stop
    STOP = "t"  # stay stopped


class StopReason(enum.Enum):
    HALTED = "halted"  # held by the VMM: attached to, or waiting for gdb before the first instruction
    INTERRUPT = "interrupt"  # gdb's Ctrl-C
    STEP = "step"
    SOFTWARE_BREAKPOINT = "swbreak"
    HARDWARE_BREAKPOINT = "hwbreak"
    WATCH = "watch"  # a write watchpoint; StopEvent.address is the data address
    READ_WATCH = "rwatch"
    ACCESS_WATCH = "awatch"
    EXITED = "exited"  # the guest powered off or reset; StopEvent.exit_status


@dataclass(frozen=True)
class StopEvent:
    vcpu: int
    reason: StopReason
    #: the data address a watchpoint triggered on
    address: int | None = None
    exit_status: int = 0


@runtime_checkable
class DebugTarget(Protocol):
    """What the stub needs of a VM. vCPUs are numbered 0..vcpu_count-1.

    Every method but ``resume`` and ``interrupt`` is called only while every vCPU is stopped.
    A method refuses a request by raising ``DebugTargetError`` (``UnmappedAddress`` for memory with
    nothing behind it); the stub turns that into an error reply.
    """

    vcpu_count: int

    def attach(self, on_stop: Callable[[StopEvent], None]) -> StopEvent:
        """Stop every vCPU (they may already be held, as with --gdb-wait) and say why they are stopped.
        Later stops (after ``resume``) are reported by calling ``on_stop``, from any thread, once per
        resume, when every vCPU has stopped."""

    def read_registers(self, vcpu: int) -> VcpuRegisters: ...

    def write_registers(self, vcpu: int, registers: VcpuRegisters) -> None: ...

    def read_virtual(self, vcpu: int, address: int, size: int) -> bytes:
        """``size`` bytes at guest-virtual ``address`` through ``vcpu``'s page tables (CR3, paging
        mode); raises ``UnmappedAddress`` when any of them is not mapped."""

    def write_virtual(self, vcpu: int, address: int, data: bytes) -> None:
        """Write regardless of page protection (a debugger patches code); ``UnmappedAddress`` as above."""

    def read_physical(self, address: int, size: int) -> bytes:
        """``UnmappedAddress`` when the range is not all guest RAM (or ROM)."""

    def set_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        """SOFTWARE: the stub has written int3 at ``address`` (length 1); stop when a vCPU executes it.
        HARDWARE: stop before executing ``address``. WRITE/READ/ACCESS_WATCH: stop after an access
        to ``[address, address + length)`` (length 1, 2, 4 or 8). On every vCPU."""

    def remove_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None: ...

    def resume(self, actions: Mapping[int, ResumeAction]) -> None:
        """Run: one action for every vCPU. Returns at once; the next stop goes to ``on_stop``."""

    def interrupt(self) -> None:
        """Stop every vCPU soon, reporting ``StopReason.INTERRUPT`` (or whatever stop came first)."""

    def detach(self) -> None:
        """gdb is gone: drop hardware breakpoints and watchpoints and let the vCPUs run freely."""

    def kill(self) -> None:
        """gdb asked to kill the guest: stop the VM."""


_SUPPORTED = (
    f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;QStartNoAckMode+;vContSupported+;swbreak+;hwbreak+"
).encode()
_VCONT_ACTIONS = b"vCont;c;C;s;S;t"
_REASON_KEYS = {
    StopReason.SOFTWARE_BREAKPOINT: "swbreak",
    StopReason.HARDWARE_BREAKPOINT: "hwbreak",
    StopReason.WATCH: "watch",
    StopReason.READ_WATCH: "rwatch",
    StopReason.ACCESS_WATCH: "awatch",
}
_WATCH_LENGTHS = (1, 2, 4, 8)
#: the most a monitor command prints (one xp)
MONITOR_DUMP_LIMIT = 4096


class _Refused(Exception):
    """A request answered with the error reply it carries."""

    def __init__(self, reply: bytes, why: str):
        super().__init__(why)
        self.reply = reply


def _hex_number(text: bytes, what: str, limit: int = ADDRESS_LIMIT) -> int:
    if not text or len(text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in text):
        raise _Refused(E_INVALID, f"bad {what} {text[:20]!r}")
    value = int(text, 16)
    if value >= limit:
        raise _Refused(E_INVALID, f"{what} {value:#x} out of range")
    return value


def _hex_bytes(text: bytes, what: str) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise _Refused(E_INVALID, f"bad hex {what}") from None


class GdbStub:
    """One gdb session. ``initial_stop`` is what ``target.attach`` returned."""

    def __init__(self, target: DebugTarget, initial_stop: StopEvent, *, packet_size: int = PACKET_SIZE):
        self.target = target
        self.vcpu_count = int(target.vcpu_count)
        if self.vcpu_count < 1:
            raise GdbError(f"a debug target with {self.vcpu_count} vCPUs")
        self.codec = RspCodec(packet_size)
        self.packet_size = packet_size
        #: bytes of guest memory one m may read: gdb asks for up to half its packet size (the reply
        #: is hex, two characters a byte; replies may exceed PacketSize, which bounds gdb's packets)
        self.max_memory = packet_size // 2
        self.last_stop = initial_stop
        self.running = False
        self.interrupting = False
        #: gdb sent D or k, or the connection is gone: the session is over
        self.finished = False
        #: gdb is gone; the session ends at the next stop (connection_lost)
        self.connection_gone = False
        self.general_vcpu = self._vcpu_of(initial_stop)
        self.control_vcpu: int | None = None  # None: every vCPU (Hc-1 / Hc0)
        #: software breakpoints: address -> the guest's byte under the int3
        self.software_breakpoints: dict[int, int] = {}
        #: the vCPU whose address space each software breakpoint was written through
        self._breakpoint_vcpus: dict[int, int] = {}
        self.hardware_breakpoints: set[tuple[BreakpointKind, int, int]] = set()
        self.gdb_features: set[str] = set()

    # ------------------------------------------------------------ the sans-IO surface

    def receive(self, data: bytes) -> None:
        """Bytes from gdb."""
        self.codec.receive_data(data)
        while not self.finished:
            event = self.codec.next_event()
            if event is None:
                break
            if isinstance(event, Interrupt):
                self._interrupt()
            elif isinstance(event, OversizedPacket):
                log.warning("gdb: a packet of %d bytes refused (limit %d)", event.size, self.packet_size)
                self.codec.send(E_TOO_BIG)
            elif isinstance(event, Packet):
                self._packet(event.payload)

    def stopped(self, event: StopEvent) -> None:
        """The target stopped (it calls ``on_stop``; the server hands the event here)."""
        if not self.running or self.finished:
            log.debug("gdb: a stop while not running ignored: %s", event)
            return
        self.running = self.interrupting = False
        self.last_stop = event
        self.general_vcpu = self._vcpu_of(event)
        self.control_vcpu = None
        if self.connection_gone:
            self._end(self.target.detach, "detach")  # the stop connection_lost asked for
            return
        self.codec.send(self._stop_reply(event))

    def connection_lost(self) -> None:
        """gdb went away without D or k: take the breakpoints out and let the guest run, as after D.

        With the vCPUs running, the breakpoints can only come out once they are stopped: this asks
        the target to stop them, and the session ends at that stop (``finished``). A caller that
        cannot wait for it calls ``abandon``.
        """
        if self.finished or self.connection_gone:
            return
        self.connection_gone = True
        if self.running:
            self._interrupt()
        else:
            self._end(self.target.detach, "detach")

    def abandon(self) -> None:
        """End the session now, without waiting for a stop: breakpoints still in guest memory stay."""
        if self.finished:
            return
        if self.software_breakpoints:
            log.warning("gdb: the session ended with the vCPUs running; int3 left at %s",
                        ", ".join(f"{a:#x}" for a in sorted(self.software_breakpoints)))  # fmt: skip
        self.finished = True
        self._call_target("detach", self.target.detach)

    def data_to_send(self) -> bytes:
        return self.codec.data_to_send()

    # ------------------------------------------------------------ dispatch

    def _packet(self, payload: bytes) -> None:
        if self.running:
            # all-stop: gdb sends nothing but Ctrl-C while the target runs
            log.warning("gdb: %r while the vCPUs run refused", payload[:20])
            self.codec.send(E_BUSY)
            return
        try:
            reply = self._dispatch(payload)
        except _Refused as refused:  # routine: gdb probes what a stub takes, and where memory is
            log.debug("gdb: %r refused: %s", payload[:40], refused)
            reply = refused.reply
        except UnmappedAddress as err:
            log.debug("gdb: %r: %s", payload[:40], err)
            reply = E_FAULT
        except DebugTargetError as err:
            log.info("gdb: %r refused by the target: %s", payload[:40], err)
            reply = E_IO
        except GdbError as err:  # a register image or number that does not fit
            log.info("gdb: %r refused: %s", payload[:40], err)
            reply = E_INVALID
        except PyvmmError as err:
            log.warning("gdb: %r failed: %s", payload[:40], err)
            reply = E_IO
        except Exception:  # a target's bug must not take the VMM down with the session
            log.exception("gdb: %r: the target failed", payload[:40])
            reply = E_IO
        if reply is not None:
            self.codec.send(reply)

    def _dispatch(self, payload: bytes) -> bytes | None:
        """The reply to ``payload``; None when there is none now (a resume: the stop comes later)."""
        if not payload:
            return b""
        command = payload[:1]
        body = payload[1:]
        if command == b"q" or command == b"Q":
            return self._query(payload)
        if command == b"v":
            return self._v_packet(payload)
        handler = self._SIMPLE.get(command)
        if handler is None:
            return b""
        return handler(self, body)

    # ------------------------------------------------------------ queries

    def _query(self, payload: bytes) -> bytes | None:
        name, _, args = payload.partition(b":")
        if name == b"qSupported":
            self.gdb_features = {f[:-1].decode("ascii", "replace") for f in args.split(b";") if f.endswith(b"+")}
            return _SUPPORTED
        if name == b"QStartNoAckMode":
            self.codec.send(b"OK")
            self.codec.stop_acks()
            return None
        if name == b"qXfer":
            return self._xfer(args)
        if name == b"qAttached":
            return b"1"  # attached to a running VM: gdb's quit detaches, not kills
        if payload == b"qC":
            return b"QC%x" % (self.general_vcpu + 1)
        if payload == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (vcpu + 1) for vcpu in range(self.vcpu_count))
        if payload == b"qsThreadInfo":
            return b"l"
        if payload.startswith(b"qThreadExtraInfo,"):
            vcpu = self._thread(payload[len(b"qThreadExtraInfo,") :], allow_all=False)
            return f"vCPU {vcpu}".encode().hex().encode()
        if payload.startswith(b"qRcmd,"):
            return self._monitor(_hex_bytes(payload[len(b"qRcmd,") :], "monitor command"))
        return b""

    def _xfer(self, args: bytes) -> bytes:
        parts = args.split(b":")
        if len(parts) != 4 or parts[0] != b"features":
            return b""  # an object this stub does not serve
        _, operation, annex, span = parts
        if operation != b"read":
            return b""
        document = TARGET_DESCRIPTION.get(annex.decode("ascii", "replace"))
        offset_text, comma, length_text = span.partition(b",")
        if document is None or not comma:
            return E_XFER
        offset = _hex_number(offset_text, "offset")
        length = _hex_number(length_text, "length")
        if offset >= len(document):
            return b"l"
        chunk = document[offset : offset + min(length, self.packet_size)]
        # the reply goes out escaped: keep it within the packet size gdb was promised
        while len(chunk) + sum(chunk.count(c) for c in b"#$}*") + 1 > self.packet_size:
            chunk = chunk[: len(chunk) // 2]
        more = offset + len(chunk) < len(document)
        return (b"m" if more else b"l") + chunk

    def _monitor(self, command: bytes) -> bytes:
        words = command.decode("utf-8", "replace").split()
        if not words or words[0] == "help":
            self._console(
                "pyvmm monitor commands:\n"
                "  help              this text\n"
                "  xp ADDR [LEN]     hex dump of LEN (default 16, at most 4096) bytes of guest-physical memory\n"
                "numbers are C-style: 0x1000 is hex, 4096 decimal\n"
            )
            return b"OK"
        if words[0] == "xp":
            return self._monitor_xp(words[1:])
        self._console(f"unknown monitor command {words[0]!r}; try 'monitor help'\n")
        return E_INVALID

    def _monitor_xp(self, args: list[str]) -> bytes:
        if len(args) not in (1, 2):
            self._console("usage: xp ADDR [LEN]\n")
            return E_INVALID
        try:
            address = int(args[0], 0)
            length = int(args[1], 0) if len(args) == 2 else 16
        except ValueError:
            self._console(f"xp: bad number in {' '.join(args)!r}\n")
            return E_INVALID
        if not 0 <= address < ADDRESS_LIMIT or not 0 < length <= MONITOR_DUMP_LIMIT or address + length > ADDRESS_LIMIT:
            self._console(f"xp: address or length out of range (length 1..{MONITOR_DUMP_LIMIT})\n")
            return E_INVALID
        try:
            data = self.target.read_physical(address, length)
        except DebugTargetError as err:
            self._console(f"xp: {err}\n")
            return E_FAULT
        lines = []
        for start in range(0, len(data), 16):
            row = data[start : start + 16]
            lines.append(f"{address + start:#018x}: " + " ".join(f"{b:02x}" for b in row) + "\n")
        self._console("".join(lines))
        return b"OK"

    def _console(self, text: str) -> None:
        """Console output for gdb to print, in O packets (gdb prints them while a qRcmd runs)."""
        data = text.encode()
        step = (self.packet_size - 1) // 2
        for start in range(0, len(data), step):
            self.codec.send(b"O" + data[start : start + step].hex().encode())

    # ------------------------------------------------------------ threads

    def _vcpu_of(self, event: StopEvent) -> int:
        return event.vcpu if 0 <= event.vcpu < self.vcpu_count else 0

    def _thread(self, text: bytes, *, allow_all: bool) -> int | None:
        """The vCPU a thread id names; None for every thread (-1) or any thread (0) where allowed."""
        if text.startswith(b"p"):  # p<pid>.<tid> (multiprocess syntax), one process here
            text = text.partition(b".")[2] or b"-1"
        if text in (b"-1", b"0"):
            if not allow_all:
                raise _Refused(E_INVALID, f"thread {text.decode()} names no single vCPU")
            return None
        tid = _hex_number(text, "thread id")
        if not 1 <= tid <= self.vcpu_count:
            raise _Refused(E_INVALID, f"no thread {tid:#x} (threads 1..{self.vcpu_count})")
        return tid - 1

    def _set_thread(self, body: bytes) -> bytes:
        operation, text = body[:1], body[1:]
        vcpu = self._thread(text, allow_all=True)
        if operation == b"g":
            if vcpu is not None:
                self.general_vcpu = vcpu
        elif operation == b"c":
            self.control_vcpu = vcpu
        else:
            raise _Refused(E_INVALID, f"H{operation.decode('ascii', 'replace')}: unknown operation")
        return b"OK"

    def _thread_alive(self, body: bytes) -> bytes:
        self._thread(body, allow_all=False)
        return b"OK"

    # ------------------------------------------------------------ registers

    def _read_all(self, body: bytes) -> bytes:
        registers = self.target.read_registers(self.general_vcpu)
        return regfile.encode_registers(registers).hex().encode()

    def _write_all(self, body: bytes) -> bytes:
        data = _hex_bytes(body, "register image")
        registers = self.target.read_registers(self.general_vcpu)
        self.target.write_registers(self.general_vcpu, regfile.decode_registers(registers, data))
        return b"OK"

    def _read_one(self, body: bytes) -> bytes:
        number = _hex_number(body, "register number")
        if number >= len(regfile.REGISTERS):
            raise _Refused(E_INVALID, f"no register {number}")
        registers = self.target.read_registers(self.general_vcpu)
        return regfile.encode_register(registers, number).hex().encode()

    def _write_one(self, body: bytes) -> bytes:
        number_text, equals, value = body.partition(b"=")
        if not equals:
            raise _Refused(E_INVALID, "P without '='")
        number = _hex_number(number_text, "register number")
        if number >= len(regfile.REGISTERS):
            raise _Refused(E_INVALID, f"no register {number}")
        registers = self.target.read_registers(self.general_vcpu)
        updated = regfile.decode_register(registers, number, _hex_bytes(value, "register value"))
        self.target.write_registers(self.general_vcpu, updated)
        return b"OK"

    # ------------------------------------------------------------ memory

    def _span(self, text: bytes, limit: int) -> tuple[int, int]:
        address_text, comma, length_text = text.partition(b",")
        if not comma:
            raise _Refused(E_INVALID, "expected ADDR,LENGTH")
        address = _hex_number(address_text, "address")
        length = _hex_number(length_text, "length")
        if length > limit:
            raise _Refused(E_TOO_BIG, f"length {length:#x} over {limit:#x}")
        if address + length > ADDRESS_LIMIT:
            raise _Refused(E_INVALID, f"{address:#x}+{length:#x} wraps the address space")
        return address, length

    def _read_memory(self, body: bytes) -> bytes:
        address, length = self._span(body, self.max_memory)
        data = self._read_guest(address, length)
        if length and not data:
            return E_FAULT
        return self._hide_breakpoints(address, data).hex().encode()

    def _read_guest(self, address: int, length: int) -> bytes:
        """As much of ``[address, address+length)`` as is mapped from its start (a short read is a
        valid m reply); empty when its first byte is not mapped."""
        try:
            return bytes(self.target.read_virtual(self.general_vcpu, address, length))
        except UnmappedAddress:
            pass
        data = bytearray()
        while len(data) < length:
            position = address + len(data)
            size = min(length - len(data), PAGE_SIZE - position % PAGE_SIZE)
            try:
                data += self.target.read_virtual(self.general_vcpu, position, size)
            except UnmappedAddress:
                break
        return bytes(data)

    def _hide_breakpoints(self, address: int, data: bytes) -> bytes:
        end = address + len(data)
        inside = [a for a in self.software_breakpoints if address <= a < end]
        if not inside:
            return data
        out = bytearray(data)
        for a in inside:
            out[a - address] = self.software_breakpoints[a]
        return bytes(out)

    def _write_memory(self, body: bytes) -> bytes:
        span, colon, text = body.partition(b":")
        if not colon:
            raise _Refused(E_INVALID, "M without ':'")
        address, length = self._span(span, self.packet_size)  # the data checks it more tightly
        data = _hex_bytes(text, "memory data")
        return self._store(address, length, data)

    def _write_binary(self, body: bytes) -> bytes:
        span, colon, data = body.partition(b":")
        if not colon:
            raise _Refused(E_INVALID, "X without ':'")
        address, length = self._span(span, self.packet_size)
        return self._store(address, length, data)

    def _store(self, address: int, length: int, data: bytes) -> bytes:
        if len(data) != length:
            raise _Refused(E_INVALID, f"length {length:#x} but {len(data):#x} bytes of data")
        if not length:
            return b"OK"
        # bytes under a breakpoint become its kept byte; the int3 stays
        kept = {a: data[a - address] for a in self.software_breakpoints if address <= a < address + length}
        out = bytearray(data)
        for a in kept:
            out[a - address] = INT3
        self.target.write_virtual(self.general_vcpu, address, bytes(out))
        self.software_breakpoints.update(kept)
        return b"OK"

    # ------------------------------------------------------------ breakpoints

    def _breakpoint_args(self, body: bytes) -> tuple[BreakpointKind, int, int]:
        fields = body.partition(b";")[0].split(b",")  # ";cond..." lists: not offered, ignored
        if len(fields) != 3 or fields[0] not in (b"0", b"1", b"2", b"3", b"4"):
            raise _Refused(E_INVALID, "expected TYPE,ADDR,KIND")
        kind = BreakpointKind(int(fields[0]))
        address = _hex_number(fields[1], "address")
        length = _hex_number(fields[2], "kind", limit=1 << 16)
        if kind in (BreakpointKind.SOFTWARE, BreakpointKind.HARDWARE):
            if length != 1:  # x86 has one breakpoint kind: a one-byte int3
                raise _Refused(E_INVALID, f"breakpoint kind {length} (x86 uses 1)")
        elif length not in _WATCH_LENGTHS:
            raise _Refused(E_INVALID, f"watchpoint length {length} (1, 2, 4 or 8)")
        return kind, address, length

    def _insert_breakpoint(self, body: bytes) -> bytes:
        kind, address, length = self._breakpoint_args(body)
        if kind == BreakpointKind.SOFTWARE:
            if address in self.software_breakpoints:
                return b"OK"
            original = self.target.read_virtual(self.general_vcpu, address, 1)[0]
            self.target.write_virtual(self.general_vcpu, address, bytes((INT3,)))
            try:
                self.target.set_breakpoint(kind, address, 1)
            except BaseException:
                self.target.write_virtual(self.general_vcpu, address, bytes((original,)))
                raise
            self.software_breakpoints[address] = original
            self._breakpoint_vcpus[address] = self.general_vcpu
            return b"OK"
        key = (kind, address, length)
        if key not in self.hardware_breakpoints:
            self.target.set_breakpoint(kind, address, length)
            self.hardware_breakpoints.add(key)
        return b"OK"

    def _remove_breakpoint(self, body: bytes) -> bytes:
        kind, address, length = self._breakpoint_args(body)
        if kind == BreakpointKind.SOFTWARE:
            if address in self.software_breakpoints:
                self._take_out_software(address)
            return b"OK"
        key = (kind, address, length)
        if key in self.hardware_breakpoints:
            self.hardware_breakpoints.discard(key)
            self.target.remove_breakpoint(kind, address, length)
        return b"OK"

    def _take_out_software(self, address: int) -> None:
        original = self.software_breakpoints.pop(address)
        vcpu = self._breakpoint_vcpus.pop(address, self.general_vcpu)
        # a guest that rewrote the byte since keeps what it wrote
        if self.target.read_virtual(vcpu, address, 1) == bytes((INT3,)):
            self.target.write_virtual(vcpu, address, bytes((original,)))
        self.target.remove_breakpoint(BreakpointKind.SOFTWARE, address, 1)

    def _take_out_breakpoints(self) -> None:
        for address in list(self.software_breakpoints):
            self._call_target(f"remove the breakpoint at {address:#x}", self._take_out_software, address)
        self.software_breakpoints.clear()
        self._breakpoint_vcpus.clear()
        for kind, address, length in sorted(self.hardware_breakpoints):
            self._call_target(f"remove the {kind.name.lower()} breakpoint at {address:#x}",
                              self.target.remove_breakpoint, kind, address, length)  # fmt: skip
        self.hardware_breakpoints.clear()

    # ------------------------------------------------------------ execution

    def _resume(self, actions: dict[int, ResumeAction], address: int | None, at_vcpu: int) -> bytes | None:
        if self.last_stop.reason == StopReason.EXITED:
            raise _Refused(E_IO, "the guest has exited")
        if address is not None:
            registers = self.target.read_registers(at_vcpu)
            registers.regs.rip = address
            self.target.write_registers(at_vcpu, registers)
        if all(action == ResumeAction.STOP for action in actions.values()):
            return self._stop_reply(self.last_stop)  # nothing to run: still stopped where it was
        self.running = True
        try:
            self.target.resume(actions)
        except BaseException:
            self.running = False
            raise
        return None

    def _continue(self, body: bytes) -> bytes | None:
        address = _hex_number(body, "address") if body else None
        at = self.control_vcpu if self.control_vcpu is not None else self.general_vcpu
        return self._resume({vcpu: ResumeAction.CONTINUE for vcpu in range(self.vcpu_count)}, address, at)

    def _step(self, body: bytes) -> bytes | None:
        address = _hex_number(body, "address") if body else None
        vcpu = self.control_vcpu if self.control_vcpu is not None else self.general_vcpu
        actions = {v: ResumeAction.STOP for v in range(self.vcpu_count)}
        actions[vcpu] = ResumeAction.STEP
        return self._resume(actions, address, vcpu)

    def _continue_signal(self, body: bytes) -> bytes | None:
        # C sig[;addr]: a VM has no signals to deliver; the signal is dropped
        _hex_number(body.partition(b";")[0], "signal", limit=0x100)
        return self._continue(body.partition(b";")[2])

    def _step_signal(self, body: bytes) -> bytes | None:
        _hex_number(body.partition(b";")[0], "signal", limit=0x100)
        return self._step(body.partition(b";")[2])

    def _v_packet(self, payload: bytes) -> bytes | None:
        if payload == b"vCont?":
            return _VCONT_ACTIONS
        if payload.startswith(b"vCont;"):
            return self._resume(self._vcont_actions(payload[len(b"vCont;") :]), None, self.general_vcpu)
        return b""  # vMustReplyEmpty, vKill, vRun, vFile...: not offered

    def _vcont_actions(self, text: bytes) -> dict[int, ResumeAction]:
        actions: dict[int, ResumeAction] = {}
        for item in text.split(b";"):
            action_text, colon, thread = item.partition(b":")
            if not action_text:
                raise _Refused(E_INVALID, "empty vCont action")
            letter = action_text[:1]
            if letter in (b"C", b"S"):
                _hex_number(action_text[1:], "signal", limit=0x100)  # dropped, as for C and S
            elif len(action_text) != 1:
                raise _Refused(E_INVALID, f"vCont action {action_text[:8]!r}")
            action = {b"c": ResumeAction.CONTINUE, b"C": ResumeAction.CONTINUE, b"s": ResumeAction.STEP,
                      b"S": ResumeAction.STEP, b"t": ResumeAction.STOP}.get(letter)  # fmt: skip
            if action is None:
                raise _Refused(E_INVALID, f"vCont action {letter!r} not offered")
            vcpus = range(self.vcpu_count)
            if colon:
                vcpu = self._thread(thread, allow_all=True)
                if vcpu is not None:
                    vcpus = (vcpu,)
            # the leftmost action naming a thread is the one it takes
            for vcpu in vcpus:
                actions.setdefault(vcpu, action)
        for vcpu in range(self.vcpu_count):
            actions.setdefault(vcpu, ResumeAction.STOP)
        return actions

    def _interrupt(self) -> None:
        if self.running and not self.interrupting:
            self.interrupting = True
            self._call_target("interrupt", self.target.interrupt)

    def _stop_reply(self, event: StopEvent) -> bytes:
        if event.reason == StopReason.EXITED:
            return b"W%02x" % (event.exit_status & 0xFF)
        signal = SIGINT if event.reason == StopReason.INTERRUPT else SIGTRAP
        reply = b"T%02xthread:%x;" % (signal, self._vcpu_of(event) + 1)
        key = _REASON_KEYS.get(event.reason)
        if key in ("swbreak", "hwbreak"):
            if key in self.gdb_features:  # a gdb that does not know the key must not get it
                reply += key.encode() + b":;"
        elif key is not None:
            reply += b"%s:%x;" % (key.encode(), event.address or 0)
        return reply

    # ------------------------------------------------------------ session end

    def _detach(self, body: bytes) -> bytes | None:
        self.codec.send(b"OK")
        self._end(self.target.detach, "detach")
        return None

    def _kill(self, body: bytes) -> bytes | None:
        self._end(self.target.kill, "kill")
        return None  # gdb waits for no reply to k

    def _end(self, action: Callable[[], None], what: str) -> None:
        self.finished = True
        self._take_out_breakpoints()
        self._call_target(what, action)

    def _call_target(self, what: str, function: Callable, *args) -> None:
        """A call whose failure can only be logged (there is no reply to carry it)."""
        try:
            function(*args)
        except Exception as err:
            log.warning("gdb: %s failed: %s", what, err)

    _SIMPLE: dict[bytes, Callable[[GdbStub, bytes], bytes | None]] = {
        b"?": lambda self, body: self._stop_reply(self.last_stop),
        b"g": _read_all,
        b"G": _write_all,
        b"p": _read_one,
        b"P": _write_one,
        b"m": _read_memory,
        b"M": _write_memory,
        b"X": _write_binary,
        b"Z": _insert_breakpoint,
        b"z": _remove_breakpoint,
        b"c": _continue,
        b"s": _step,
        b"C": _continue_signal,
        b"S": _step_signal,
        b"H": _set_thread,
        b"T": _thread_alive,
        b"D": _detach,
        b"k": _kill,
    }
