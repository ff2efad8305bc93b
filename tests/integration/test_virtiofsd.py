"""pyvmm's vhost-user front end against the real virtiofsd (QEMU 7.2's, /usr/lib/qemu/virtiofsd).

No guest: a mock driver (devices/virtio/mock_driver.py) sets the virtio-fs device up over
virtio-mmio on shared guest memory, so the handshake, the memory table and the vrings are
those virtiofsd really accepts; FUSE requests then travel through virtiofsd's own ring code
(FUSE_INIT, GETATTR of the root, MKDIR on a writable and on a read-only share). Also the
daemon's lifecycle: missing binary, a daemon that dies at start, stop() leaves nothing.
"""

from __future__ import annotations

import os
import stat
import struct
import time

import psutil
import pytest

from pyvmm.devices.irq import IrqLine
from pyvmm.devices.vhost_user.frontend import Frontend
from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.fs import VirtioFs
from pyvmm.devices.virtio.mock_driver import MockDriver
from pyvmm.devices.virtio.status import DEVICE_NEEDS_RESET
from pyvmm.host.virtiofsd import DEFAULT_BINARY, Virtiofsd, VirtiofsdError
from pyvmm.vmm.events import EventLoop
from pyvmm.vmm.memory import GuestMemory


def need_virtiofsd():
    if not os.path.exists(DEFAULT_BINARY):
        pytest.skip(f"{DEFAULT_BINARY} missing (Debian package qemu-system-common)")
    if os.geteuid() != 0:
        pytest.skip("virtiofsd's sandbox (mount/pid namespaces) needs root")


FUSE_GETATTR, FUSE_MKDIR, FUSE_INIT = 3, 9, 26
EROFS = 30


class FuseGuest:
    """virtio-fs behind virtio-mmio on shared memory, with virtiofsd behind it, and a FUSE client."""

    def __init__(self, shared_dir, *, read_only=False):
        self.daemon = Virtiofsd(shared_dir, read_only=read_only).start()
        self.memory = GuestMemory.shared([(0, 8 << 20)])
        self.device = VirtioFs(Frontend.connect(self.daemon.socket_path, name="virtio-fs0"), "tag",
                               name="virtio-fs0", backend_process=self.daemon)  # fmt: skip
        self.transport = mmio.VirtioMmio(self.device, self.memory, IrqLine(5, lambda _irq, _level: None))
        self.loop = EventLoop("test-virtiofsd")
        self.transport.attach(self.loop)
        self.loop.start()
        self.driver = MockDriver(self.transport, self.memory)
        self.unique = 0

    def request(self, opcode: int, body: bytes = b"", *, nodeid: int = 1, out_size: int = 256) -> tuple[int, bytes]:
        """(error, reply body) of one FUSE request on request queue 1."""
        self.unique += 1
        header = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, self.unique, nodeid, 0, 0, os.getpid(), 0, 0)
        src, dst = self.driver.alloc(40 + len(body)), self.driver.alloc(16 + out_size)
        self.memory.write(src, header + body)
        queue = self.driver.queues[1]
        queue.add([(src, 40 + len(body), False), (dst, 16 + out_size, True)])
        deadline = time.monotonic() + 5
        while queue.used_idx() == queue.last_used:
            assert time.monotonic() < deadline, f"virtiofsd never answered opcode {opcode}"
            time.sleep(0.002)
        [(_head, length)] = queue.take_used()
        out_len, error, unique = struct.unpack("<IiQ", self.memory.read(dst, 16))
        assert unique == self.unique and out_len == length
        return -error, self.memory.read(dst + 16, length - 16)

    def init(self) -> None:
        error, body = self.request(FUSE_INIT, struct.pack("<IIII", 7, 31, 1 << 17, 0), nodeid=0)
        assert error == 0 and struct.unpack_from("<II", body) [0] == 7

    def close(self):
        self.transport.close()
        self.loop.close()
        self.memory.close()


@pytest.fixture
def guests():
    made = []

    def make(shared_dir, **kwargs):
        guest = FuseGuest(shared_dir, **kwargs)
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.close()


def test_handshake_mem_table_vrings_and_fuse_requests(tmp_path, guests):
    need_virtiofsd()
    (tmp_path / "file").write_text("x")
    guest = guests(tmp_path)
    assert guest.device.backend_features >> 32 & 1  # VERSION_1
    assert guest.device.protocol_features & (1 << 3)  # REPLY_ACK: every set request was acknowledged
    guest.driver.setup()
    assert guest.transport.status & DEVICE_NEEDS_RESET == 0, guest.transport.last_error
    guest.init()
    error, body = guest.request(FUSE_GETATTR, struct.pack("<IIQ", 0, 0, 0))
    assert error == 0
    mode = struct.unpack_from("<I", body, 16 + 60)[0]  # fuse_attr_out: 16 bytes, then fuse_attr.mode at 60
    assert stat.S_ISDIR(mode)
    assert guest.transport.interrupt_status & mmio.INTERRUPT_USED_BUFFER  # virtiofsd's call, relayed
    error, _ = guest.request(FUSE_MKDIR, struct.pack("<II", 0o755, 0) + b"made-by-fuse\0")
    assert error == 0 and (tmp_path / "made-by-fuse").is_dir()


def test_read_only_share_is_enforced_by_the_host(tmp_path, guests):
    need_virtiofsd()
    guest = guests(tmp_path, read_only=True)
    guest.driver.setup()
    guest.init()
    error, _ = guest.request(FUSE_MKDIR, struct.pack("<II", 0o755, 0) + b"refused\0")
    assert error == EROFS
    assert not (tmp_path / "refused").exists()
    assert os.access(tmp_path, os.W_OK)  # the host's own view stays writable: the ro mount is the daemon's


def test_reset_and_restart_on_the_real_backend(tmp_path, guests):
    need_virtiofsd()
    guest = guests(tmp_path)
    guest.driver.setup()
    guest.init()
    guest.driver.set_status(0)  # GET_VRING_BASE stops virtiofsd's queue threads
    guest.driver.setup()
    assert guest.transport.status & DEVICE_NEEDS_RESET == 0, guest.transport.last_error
    guest.init()  # virtiofsd accepts a new FUSE session after the reset


def test_daemon_death_fails_the_device(tmp_path, guests):
    need_virtiofsd()
    guest = guests(tmp_path)
    guest.driver.setup()
    guest.daemon.process.kill()
    deadline = time.monotonic() + 5
    while not guest.transport.status & DEVICE_NEEDS_RESET:
        assert time.monotonic() < deadline, "the device never noticed its backend died"
        time.sleep(0.01)
    assert guest.transport.last_error == "virtio-fs0: the vhost-user backend closed the connection"


def _virtiofsd_processes(socket_path: str) -> list:
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if any(socket_path in arg for arg in p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_stop_leaves_no_process_and_no_socket(tmp_path):
    need_virtiofsd()
    daemon = Virtiofsd(tmp_path).start()
    frontend = Frontend.connect(daemon.socket_path)
    frontend.set_owner()  # connected: virtiofsd has forked its sandboxed child by now
    socket_path, workdir = daemon.socket_path, daemon.workdir
    assert _virtiofsd_processes(socket_path)
    daemon.stop()
    frontend.close()
    assert not os.path.exists(workdir)
    deadline = time.monotonic() + 3
    while _virtiofsd_processes(socket_path):
        assert time.monotonic() < deadline, "a virtiofsd survived stop()"
        time.sleep(0.05)


def test_missing_binary_is_one_line(tmp_path):
    with pytest.raises(VirtiofsdError) as info:
        Virtiofsd(tmp_path, binary=str(tmp_path / "no-virtiofsd")).start()
    assert str(info.value) == (f"virtiofsd not found at {tmp_path / 'no-virtiofsd'}: install Debian's "
                               "qemu-system-common package (or set PYVMM_VIRTIOFSD)")  # fmt: skip


def test_a_daemon_that_dies_at_start_reports_its_stderr(tmp_path):
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\necho 'fuse: unknown option' >&2\necho 'second line' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(VirtiofsdError) as info:
        Virtiofsd(tmp_path, binary=str(fake)).start()
    message = str(info.value)
    assert message == "virtiofsd: virtiofsd exited with status 1 before listening: fuse: unknown option | second line"


def test_a_daemon_that_never_listens_times_out(tmp_path):
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\necho waiting >&2\nexec sleep 30\n")
    fake.chmod(0o755)
    daemon = Virtiofsd(tmp_path, binary=str(fake), start_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(VirtiofsdError, match=r"did not create its socket within 0.5 s: waiting$"):
        daemon.start()
    assert time.monotonic() - started < 5
    assert daemon.process is None  # stopped (killed) on the way out
