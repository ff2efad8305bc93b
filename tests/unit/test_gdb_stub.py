"""The gdb protocol session against a fake DebugTarget (a bytearray memory, vCPUs with Regs): the
target description, registers, memory, breakpoints, resumes with per-thread actions, stop replies,
threads, monitor commands, detach and kill, and error replies for every kind of bad input; fuzzed."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from gdb_fake import CODE, VIRTUAL_BASE, FakeTarget, Session, gdb_frame, parse_replies
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.gdb.packets import escape
from pyvmm.gdb.stub import BreakpointKind, ResumeAction, StopEvent, StopReason
from pyvmm.gdb.target import REGISTERS, TARGET_DESCRIPTION, encode_registers, register_number

C, S, T = ResumeAction.CONTINUE, ResumeAction.STEP, ResumeAction.STOP


@pytest.fixture
def session():
    s = Session(FakeTarget(2))
    s.request(b"qSupported:multiprocess+;swbreak+;hwbreak+;vContSupported+")
    yield s
    assert not s.target.violations


def offset(address: int) -> int:
    return address - VIRTUAL_BASE


def spin(target: FakeTarget) -> None:
    for vcpu in range(target.vcpu_count):
        at = offset(CODE + 0x100 * vcpu)
        target.memory[at : at + 2] = b"\xeb\xfe"  # jmp $: runs until interrupted


# ------------------------------------------------------------------ handshake, description


def test_qsupported_and_the_first_stop(session):
    reply = Session().request(b"qSupported:xmlRegisters=i386")
    features = reply.split(b";")
    assert b"PacketSize=4000" in features
    for feature in (b"qXfer:features:read+", b"QStartNoAckMode+", b"vContSupported+", b"swbreak+", b"hwbreak+"):
        assert feature in features
    assert session.request(b"?") == b"T05thread:1;"
    assert session.request(b"qAttached") == b"1"
    assert session.request(b"vMustReplyEmpty") == b""


def test_no_ack_mode_through_the_stub(session):
    session.stub.receive(gdb_frame(b"QStartNoAckMode"))
    packets, acks = parse_replies(session.stub.data_to_send())
    assert packets == [b"OK"] and acks == b"+"
    session.stub.receive(gdb_frame(b"qC") + b"+")
    packets, acks = parse_replies(session.stub.data_to_send())
    assert packets == [b"QC1"] and acks == b""


def read_annex(session: Session, annex: str, chunk: int) -> bytes:
    data = b""
    while True:
        reply = session.request(b"qXfer:features:read:%s:%x,%x" % (annex.encode(), len(data), chunk))
        assert reply[:1] in (b"m", b"l") and len(reply) - 1 <= chunk, reply
        data += reply[1:]
        if reply[:1] == b"l":
            return data


def test_target_description_read_in_chunks_and_parsed(session):
    target_xml = read_annex(session, "target.xml", 0x40)
    assert target_xml == TARGET_DESCRIPTION["target.xml"]
    root = ET.fromstring(target_xml)
    assert root.find("architecture").text == "i386:x86-64"
    names = []
    for include in root.iter("{http://www.w3.org/2001/XInclude}include"):
        feature = ET.fromstring(read_annex(session, include.get("href"), 0x33))
        names += [reg.get("name") for reg in feature.iter("reg")]
    assert names == [reg.name for reg in REGISTERS]


def test_qxfer_edges(session):
    size = len(TARGET_DESCRIPTION["target.xml"])
    assert session.request(b"qXfer:features:read:target.xml:%x,10" % size) == b"l"
    assert session.request(b"qXfer:features:read:target.xml:%x,10" % (size + 5)) == b"l"
    assert session.request(b"qXfer:features:read:nonesuch.xml:0,10") == b"E00"
    assert session.request(b"qXfer:features:read:target.xml:zz,10") == b"E16"
    assert session.request(b"qXfer:features:read:target.xml:0") == b"E00"
    assert session.request(b"qXfer:memory-map:read::0,10") == b""
    assert session.request(b"qXfer:features:write:target.xml:0,10") == b""


def test_a_description_with_framing_bytes_is_escaped_and_fits_the_packet():
    s = Session(FakeTarget(1), packet_size=0x40)
    data = read_annex(s, "pyvmm-x86_64-core.xml", 0x1000)
    assert data == TARGET_DESCRIPTION["pyvmm-x86_64-core.xml"]


# ------------------------------------------------------------------ registers


def test_g_reads_the_selected_vcpu_and_g_round_trips(session):
    target = session.target
    image = bytes.fromhex(session.request(b"g").decode())
    assert image == encode_registers(target.vcpus[0])
    assert session.request(b"Hg2") == b"OK"
    assert bytes.fromhex(session.request(b"g").decode()) == encode_registers(target.vcpus[1])
    # G: change rip and rax of vCPU 1, the rest comes back unchanged
    changed = bytearray(encode_registers(target.vcpus[1]))
    changed[16 * 8 : 17 * 8] = (0x401234).to_bytes(8, "little")
    changed[0:8] = (0xABCDEF).to_bytes(8, "little")
    assert session.request(b"G" + changed.hex().encode()) == b"OK"
    assert target.vcpus[1].regs.rip == 0x401234 and target.vcpus[1].regs.rax == 0xABCDEF
    assert bytes.fromhex(session.request(b"g").decode()) == bytes(changed)
    assert target.vcpus[0].regs.rip == CODE  # vCPU 0 untouched
    assert session.request(b"G" + changed[:-1].hex().encode()) == b"E16"  # one byte short
    assert session.request(b"G" + changed.hex().encode()[:-1]) == b"E16"  # odd hex


def test_p_and_p_write_single_registers_by_number(session):
    target = session.target
    rip, cr3, efer = (register_number(n) for n in ("rip", "cr3", "efer"))
    assert session.request(b"p%x" % rip) == CODE.to_bytes(8, "little").hex().encode()
    assert session.request(b"p%x" % efer) == (0xD01).to_bytes(8, "little").hex().encode()
    assert session.request(b"P%x=%s" % (cr3, (0x5000).to_bytes(8, "little").hex().encode())) == b"OK"
    assert target.vcpus[0].sregs.cr3 == 0x5000
    assert session.request(b"p%x" % len(REGISTERS)) == b"E16"
    assert session.request(b"P%x=00" % len(REGISTERS)) == b"E16"
    assert session.request(b"P%x=0011" % rip) == b"E16"  # 2 bytes for an 8-byte register
    assert session.request(b"P%x" % rip) == b"E16"
    assert session.request(b"pxyz") == b"E16"


# ------------------------------------------------------------------ memory


def test_m_m_and_x(session):
    target = session.target
    target.memory[0x2000:0x2004] = b"\x01\x02\x03\x04"
    assert session.request(b"m402000,4") == b"01020304"
    assert session.request(b"M402001,2:aabb") == b"OK"
    assert target.memory[0x2000:0x2004] == b"\x01\xaa\xbb\x04"
    framing = b"#$}*\x03\x00"
    assert session.request(b"X402010,%x:" % len(framing) + escape(framing)) == b"OK"
    assert target.memory[0x2010:0x2016] == framing
    assert session.request(b"X402010,0:") == b"OK"  # gdb's probe for X
    assert session.request(b"m402000,0") == b""


def test_an_x_write_may_carry_more_bytes_than_an_m_read_returns(session):
    data = bytes(range(256)) * 0x30  # 12 KiB: binary X packets fit more than half the packet size
    escaped = escape(data)
    assert session.request(b"X402000,%x:" % len(data) + escaped) == b"OK"
    assert session.target.memory[0x2000 : 0x2000 + len(data)] == data
    assert session.request(b"m402000,2001") == b"E07"


def test_unmapped_and_malformed_memory_requests_get_error_replies(session):
    assert session.request(b"m0,4") == b"E0e"
    assert session.request(b"M0,1:00") == b"E0e"
    assert session.request(b"X0,1:\x00") == b"E0e"
    assert session.request(b"m%x,4" % (VIRTUAL_BASE + 0x10000)) == b"E0e"
    assert session.request(b"m4020004") == b"E16"  # no comma
    assert session.request(b"mzz,4") == b"E16"
    assert session.request(b"m402000,") == b"E16"
    assert session.request(b"m1ffffffffffffffff,1") == b"E16"  # 17 digits
    assert session.request(b"mffffffffffffffff,2") == b"E16"  # wraps
    assert session.request(b"m402000,100000") == b"E07"  # over the bound
    assert session.request(b"M402000,2:aa") == b"E16"  # length and data differ
    assert session.request(b"M402000,1:zz") == b"E16"
    assert session.request(b"M402000,1") == b"E16"
    assert session.request(b"X402000,2:a") == b"E16"


def test_a_read_running_into_an_unmapped_page_is_short():
    target = FakeTarget(1, holes=(VIRTUAL_BASE + 0x3000,))
    s = Session(target)
    target.memory[0x2FFE:0x3000] = b"\x55\x66"
    assert s.request(b"m402ffe,8") == b"5566"
    assert s.request(b"m403000,8") == b"E0e"


# ------------------------------------------------------------------ breakpoints


def test_software_breakpoints_are_invisible_to_reads_and_writes(session):
    target = session.target
    target.memory[offset(CODE + 4)] = 0x55
    assert session.request(b"Z0,%x,1" % (CODE + 4)) == b"OK"
    assert target.memory[offset(CODE + 4)] == 0xCC  # patched into guest memory
    assert (BreakpointKind.SOFTWARE, CODE + 4, 1) in target.breakpoints
    assert session.request(b"m%x,8" % CODE) == b"9090909055909090"
    assert session.request(b"Z0,%x,1" % (CODE + 4)) == b"OK"  # again: nothing changes
    # a write over it changes the kept byte; the int3 stays
    assert session.request(b"M%x,3:414243" % (CODE + 3)) == b"OK"
    assert target.memory[offset(CODE + 3) : offset(CODE + 6)] == b"\x41\xcc\x43"
    assert session.request(b"m%x,3" % (CODE + 3)) == b"414243"
    assert session.request(b"z0,%x,1" % (CODE + 4)) == b"OK"
    assert target.memory[offset(CODE + 3) : offset(CODE + 6)] == b"ABC"
    assert not target.breakpoints
    assert session.request(b"z0,%x,1" % (CODE + 4)) == b"OK"  # not there: nothing to do


def test_a_breakpoint_byte_the_guest_rewrote_is_left_alone(session):
    target = session.target
    assert session.request(b"Z0,%x,1" % CODE) == b"OK"
    target.memory[offset(CODE)] = 0xF4  # the guest wrote code over it
    assert session.request(b"z0,%x,1" % CODE) == b"OK"
    assert target.memory[offset(CODE)] == 0xF4


def test_bad_breakpoints_get_error_replies(session):
    assert session.request(b"Z0,10,1") == b"E0e"  # unmapped
    assert session.request(b"Z0,%x,2" % CODE) == b"E16"  # x86 has one kind
    assert session.request(b"Z5,%x,1" % CODE) == b"E16"
    assert session.request(b"Z2,406000,3") == b"E16"
    assert session.request(b"Z1,%x" % CODE) == b"E16"
    assert session.request(b"Z0") == b"E16"
    assert not session.target.breakpoints and not session.stub.software_breakpoints


def test_hardware_breakpoints_and_watchpoints_go_to_the_target(session):
    target = session.target
    for packet in (b"Z1,401010,1", b"Z2,406000,1", b"Z3,406008,8", b"Z4,406010,4"):
        assert session.request(packet) == b"OK"
    assert target.breakpoints == {
        (BreakpointKind.HARDWARE, 0x401010, 1), (BreakpointKind.WRITE_WATCH, 0x406000, 1),
        (BreakpointKind.READ_WATCH, 0x406008, 8), (BreakpointKind.ACCESS_WATCH, 0x406010, 4),
    }  # fmt: skip
    assert session.request(b"Z2,406100,2") == b"E05"  # the target has no fifth debug register
    assert session.request(b"z3,406008,8") == b"OK"
    assert (BreakpointKind.READ_WATCH, 0x406008, 8) not in target.breakpoints
    assert session.request(b"Z2,406100,2") == b"OK"


# ------------------------------------------------------------------ execution and stop replies


def test_continue_to_a_software_breakpoint(session):
    assert session.request(b"Z0,%x,1" % (CODE + 8)) == b"OK"
    assert session.request(b"vCont;c") == b"T05thread:1;swbreak:;"
    assert session.target.resumes[-1] == {0: C, 1: C}
    assert session.target.vcpus[0].regs.rip == CODE + 8


def test_gdb_without_swbreak_gets_a_plain_t05():
    s = Session(FakeTarget(1))
    s.request(b"qSupported:multiprocess+")
    s.request(b"Z0,%x,1" % (CODE + 2))
    s.request(b"Z1,%x,1" % (CODE + 1))
    assert s.request(b"c") == b"T05thread:1;"


def test_vcont_with_per_thread_actions_and_the_stop_names_the_thread(session):
    target = session.target
    assert session.request(b"vCont;s:2;c") == b"T05thread:2;"
    assert target.resumes[-1] == {0: C, 1: S}
    assert target.vcpus[1].regs.rip == CODE + 0x101
    assert session.request(b"qC") == b"QC2"  # the thread that stopped is the current one
    assert session.request(b"vCont;s:1") == b"T05thread:1;"
    assert target.resumes[-1] == {0: S, 1: T}
    assert session.request(b"vCont;s:1;c:1") == b"T05thread:1;"  # the leftmost action for a thread wins
    assert target.resumes[-1] == {0: S, 1: T}
    assert session.request(b"vCont;C05:2;S0b:1") == b"T05thread:1;"  # signals dropped
    assert target.resumes[-1] == {0: S, 1: C}
    assert session.request(b"vCont;s:-1") == b"T05thread:1;"
    assert target.resumes[-1] == {0: S, 1: S}
    count = len(target.resumes)
    assert session.request(b"vCont;t") == b"T05thread:1;"  # nothing to run: still stopped
    for bad in (b"vCont;s:3", b"vCont;r401000,401010", b"vCont;", b"vCont;x", b"vCont;cc", b"vCont;Czz", b"vCont;s:zz"):
        assert session.request(bad) == b"E16", bad
    assert len(target.resumes) == count
    assert session.request(b"vCont?") == b"vCont;c;C;s;S;t"


def test_legacy_c_and_s(session):
    target = session.target
    assert session.request(b"s") == b"T05thread:1;"
    assert target.resumes[-1] == {0: S, 1: T}
    assert session.request(b"Hc2") == b"OK"
    assert session.request(b"s%x" % (CODE + 0x200)) == b"T05thread:2;"  # s ADDR: resume there
    assert target.resumes[-1] == {0: T, 1: S} and target.vcpus[1].regs.rip == CODE + 0x201
    assert session.request(b"S05") == b"T05thread:2;"
    assert session.request(b"Z1,%x,1" % (CODE + 0x10)) == b"OK"
    assert session.request(b"c%x" % (CODE + 8)) == b"T05thread:1;hwbreak:;"
    assert target.resumes[-1] == {0: C, 1: C}
    assert target.vcpus[0].regs.rip == CODE + 0x10
    assert session.request(b"C05;%x" % (CODE + 0x10)) == b"T05thread:1;hwbreak:;"
    assert session.request(b"Czz") == b"E16"
    assert session.request(b"czz") == b"E16"


def test_watchpoint_stop_carries_the_address(session):
    target = session.target
    target.memory[offset(CODE + 2)] = 0xAA  # stosb: [rdi] = al
    rdi = target.vcpus[0].regs.rdi
    assert session.request(b"Z2,%x,1" % rdi) == b"OK"
    assert session.request(b"vCont;c") == b"T05thread:1;watch:%x;" % rdi
    assert target.memory[offset(rdi)] == 0x11
    assert session.request(b"z2,%x,1" % rdi) == b"OK"
    target.vcpus[0].regs.rip = CODE + 2
    assert session.request(b"Z4,%x,4" % rdi) == b"OK"
    assert session.request(b"vCont;c") == b"T05thread:1;awatch:%x;" % rdi


@pytest.mark.parametrize("reason, key", [(StopReason.READ_WATCH, b"rwatch"), (StopReason.WATCH, b"watch")])
def test_other_stop_replies(session, reason, key):
    spin(session.target)
    assert session.send_raw(gdb_frame(b"c")) == []
    session.target.running = False
    session.stub.stopped(StopEvent(1, reason, address=0x1234))
    assert parse_replies(session.stub.data_to_send())[0] == [b"T05thread:2;%s:1234;" % key]


def test_ctrl_c_stops_a_running_guest_and_packets_meanwhile_are_refused(session):
    target = session.target
    spin(target)
    assert session.send_raw(gdb_frame(b"vCont;c")) == []
    assert session.stub.running
    assert session.request(b"g") == b"E10"
    target.on_stop = lambda event: None  # the stop arrives later, not inside interrupt()
    assert session.send_raw(b"\x03\x03") == []
    assert target.interrupts == 1  # the second Ctrl-C is the same request
    session.stub.stopped(StopEvent(0, StopReason.INTERRUPT))
    assert parse_replies(session.stub.data_to_send())[0] == [b"T02thread:1;"]
    assert session.send_raw(b"\x03") == [] and target.interrupts == 1  # stopped: nothing to interrupt
    assert session.request(b"?") == b"T02thread:1;"


def test_a_stop_while_stopped_is_ignored(session):
    session.stub.stopped(StopEvent(1, StopReason.STEP))
    assert session.stub.data_to_send() == b""
    assert session.request(b"?") == b"T05thread:1;"


def test_the_guest_exiting(session):
    spin(session.target)
    session.send_raw(gdb_frame(b"c"))
    session.target.running = False
    session.stub.stopped(StopEvent(0, StopReason.EXITED, exit_status=3))
    assert parse_replies(session.stub.data_to_send())[0] == [b"W03"]
    assert session.request(b"?") == b"W03"
    assert session.request(b"c") == b"E05"


# ------------------------------------------------------------------ threads


def test_threads(session):
    assert session.request(b"qfThreadInfo") == b"m1,2"
    assert session.request(b"qsThreadInfo") == b"l"
    assert session.request(b"qC") == b"QC1"
    assert session.request(b"T1") == b"OK" and session.request(b"T2") == b"OK"
    assert session.request(b"T3") == b"E16" and session.request(b"T0") == b"E16"
    assert session.request(b"Hg2") == b"OK" and session.request(b"qC") == b"QC2"
    assert session.request(b"Hg0") == b"OK" and session.request(b"qC") == b"QC2"  # any: keeps the current one
    assert session.request(b"Hgp1.1") == b"OK" and session.request(b"qC") == b"QC1"
    assert session.request(b"Hg3") == b"E16"
    assert session.request(b"Hx1") == b"E16"
    assert session.request(b"qThreadExtraInfo,2") == b"vCPU 1".hex().encode()
    assert session.request(b"qThreadExtraInfo,9") == b"E16"


def test_four_vcpus():
    s = Session(FakeTarget(4))
    assert s.request(b"qfThreadInfo") == b"m1,2,3,4"
    assert s.request(b"vCont;s:4;t") == b"T05thread:4;"
    assert s.target.resumes[-1] == {0: T, 1: T, 2: T, 3: S}


# ------------------------------------------------------------------ monitor


def monitor(session: Session, command: str) -> tuple[str, bytes]:
    replies = session.send_raw(gdb_frame(b"qRcmd," + command.encode().hex().encode()))
    assert all(r.startswith(b"O") for r in replies[:-1]), replies
    return "".join(bytes.fromhex(r[1:].decode()).decode() for r in replies[:-1]), replies[-1]


def test_monitor_commands(session):
    session.target.memory[0x20:0x40] = bytes(range(0x20, 0x40))
    text, final = monitor(session, "help")
    assert "xp ADDR [LEN]" in text and final == b"OK"
    text, final = monitor(session, "xp 0x20 20")
    assert final == b"OK"
    assert text.splitlines() == [
        "0x0000000000000020: " + " ".join(f"{b:02x}" for b in range(0x20, 0x30)),
        "0x0000000000000030: " + " ".join(f"{b:02x}" for b in range(0x30, 0x34)),
    ]
    assert monitor(session, "xp 0x10000 4") == ("xp: guest-physical address 0x10000 is not mapped\n", b"E0e")
    assert monitor(session, "xp 0x20 0")[1] == b"E16"
    assert monitor(session, "xp 0x20 5000")[1] == b"E16"
    assert monitor(session, "xp zz")[1] == b"E16"
    assert monitor(session, "xp")[1] == b"E16"
    assert monitor(session, "reboot") == ("unknown monitor command 'reboot'; try 'monitor help'\n", b"E16")
    assert session.request(b"qRcmd,7") == b"E16"  # odd hex


def test_a_long_monitor_output_is_split_into_packets_that_fit():
    s = Session(FakeTarget(1), packet_size=0x80)
    text, final = monitor(s, "xp 0 256")
    assert final == b"OK" and len(text.splitlines()) == 16


# ------------------------------------------------------------------ session end


def test_detach_takes_breakpoints_out_and_lets_the_guest_go(session):
    target = session.target
    session.request(b"Z0,%x,1" % CODE)
    session.request(b"Z2,406000,4")
    assert session.request(b"D") == b"OK"
    assert target.memory[offset(CODE)] == 0x90 and not target.breakpoints
    assert target.detached and not target.killed
    assert session.stub.finished
    assert session.send_raw(gdb_frame(b"g")) == []  # nothing after the end


def test_kill(session):
    session.request(b"Z0,%x,1" % CODE)
    assert session.send_raw(gdb_frame(b"k")) == []
    assert session.target.killed and session.stub.finished
    assert session.target.memory[offset(CODE)] == 0x90


def test_connection_lost_detaches(session):
    session.request(b"Z1,401000,1")
    session.stub.connection_lost()
    assert session.target.detached and not session.target.breakpoints
    session.stub.connection_lost()  # twice is harmless


def test_connection_lost_while_running_stops_the_vcpus_first():
    s = Session(FakeTarget(2))
    spin(s.target)
    assert s.request(b"Z0,%x,1" % (CODE + 0x200)) == b"OK"
    assert s.send_raw(gdb_frame(b"vCont;c")) == []
    s.target.on_stop = s.stops.append
    s.stub.connection_lost()
    assert s.target.interrupts == 1 and not s.stub.finished
    assert s.target.memory[offset(CODE + 0x200)] == 0xCC  # not touched while the vCPUs run
    s.stub.stopped(s.stops.pop())
    assert s.stub.finished and s.target.detached
    assert s.target.memory[offset(CODE + 0x200)] == 0x90 and not s.target.breakpoints
    assert s.stub.data_to_send() == b""  # no stop reply to a gdb that is gone
    assert not s.target.violations


def test_abandon_when_the_vcpus_never_stop():
    s = Session(FakeTarget(1))
    spin(s.target)
    s.request(b"Z0,%x,1" % (CODE + 0x200))
    s.send_raw(gdb_frame(b"c"))
    s.target.on_stop = lambda event: None  # a stop that never comes
    s.stub.connection_lost()
    s.stub.abandon()
    assert s.stub.finished and s.target.detached
    assert s.target.memory[offset(CODE + 0x200)] == 0xCC  # left: it could not be taken out safely
    assert not s.target.violations


# ------------------------------------------------------------------ robustness


def test_unknown_packets_get_an_empty_reply(session):
    for packet in (b"!", b"R00", b"qTStatus", b"qOffsets", b"vFile:open:", b"QNonStop:1", b"bc", b"i"):
        assert session.request(packet) == b"", packet
    assert session.request(b"") == b""


def test_an_oversized_packet_gets_an_error_and_the_session_goes_on():
    s = Session(FakeTarget(1), packet_size=0x100)
    assert s.request(b"X401000,200:" + b"a" * 0x200) == b"E07"
    assert s.request(b"qC") == b"QC1"
    assert s.request(b"m401000,80") == b"90" * 0x80  # half the packet size, as gdb reads
    assert s.request(b"m401000,81") == b"E07"


class BrokenTarget(FakeTarget):
    def read_registers(self, vcpu):
        raise RuntimeError("a bug in the backend")


def test_a_target_bug_is_an_error_reply_not_an_exception():
    s = Session(BrokenTarget(1))
    assert s.request(b"g") == b"E05"
    assert s.request(b"p0") == b"E05"
    assert s.request(b"qC") == b"QC1"


PREFIXES = [b"g", b"G", b"p", b"P", b"m", b"M", b"X", b"Z", b"z", b"c", b"s", b"C", b"S", b"vCont;", b"vCont?",
            b"H", b"Hg", b"Hc", b"T", b"?", b"qC", b"qfThreadInfo", b"qsThreadInfo", b"qXfer:features:read:",
            b"qXfer:features:read:target.xml:", b"qRcmd,", b"qSupported:", b"qThreadExtraInfo,", b"qAttached",
            b"QStartNoAckMode", b"v", b"q", b""]  # fmt: skip
ARGS = st.one_of(
    st.text("0123456789abcdefABCDEF,:;=-.ptscSC", max_size=40).map(str.encode),
    st.sampled_from([b"401000,4", b"401000,1:ff", b"0,1,1", b"0,401004,1", b"2,406000,4", b"1", b"2", b"-1",
                     b"%x=00" % register_number("rip"), b"s:1;c", b"c:2", b"target.xml:0,20",
                     b"7870203020320a".hex().encode(), b"ffffffffffffffff,ffffffffffffffff"]),  # fmt: skip
    st.binary(max_size=30),
)
ITEMS = st.one_of(st.tuples(st.sampled_from(PREFIXES), ARGS).map(lambda t: t[0] + t[1]), st.just(b"\x03"))


@given(st.lists(ITEMS, max_size=25))
def test_fuzz_the_stub_always_answers_and_never_raises(items):
    target = FakeTarget(2)
    spin(target)  # c runs until Ctrl-C
    s = Session(target)
    for item in items:
        if item == b"\x03":
            s.send_raw(item)
            continue
        if s.stub.finished:
            break
        running_before = s.stub.running
        replies = s.send_raw(gdb_frame(escape(item)))
        if s.stub.finished or (s.stub.running and not running_before):
            continue  # D, k, or a resume whose stop is still to come
        assert replies, item
        if item.startswith(b"qRcmd,") and len(replies) > 1:
            assert all(r.startswith(b"O") for r in replies[:-1])
        else:
            assert len(replies) == 1, (item, replies)
    assert not target.violations
    for address, original in s.stub.software_breakpoints.items():
        assert target.memory[offset(address)] == 0xCC and 0 <= original <= 0xFF


@given(st.binary(max_size=3000))
def test_fuzz_raw_bytes_never_raise(data):
    s = Session(FakeTarget(2))
    s.stub.receive(data)
    s.stub.data_to_send()
    assert not s.target.violations
