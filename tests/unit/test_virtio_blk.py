"""virtio-blk against real raw images and failing fakes, driven by the mock driver."""

import errno
import os
import struct

import pytest

from pyvmm.devices.virtio import blk
from pyvmm.devices.virtio.blk import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    RawImage,
    VirtioBlock,
)
from pyvmm.devices.virtio.mock_driver import mock_guest
from pyvmm.devices.virtio.status import DEVICE_NEEDS_RESET
from pyvmm.errors import DeviceError

IMAGE_SIZE = 256 * 1024


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return path


class Disk:
    """A mock driver speaking virtio-blk requests."""

    def __init__(self, device, **setup):
        self.device = device
        self.driver = mock_guest(device, 4 << 20)
        self.features = self.driver.setup(**setup)
        self.queue = self.driver.queues[0]
        self.mem = self.driver.memory

    def request(self, kind, sector=0, *, out=b"", in_len=0, indirect=False, split_header=False):
        """Submit one request; returns (status byte, used length, data read)."""
        d = self.driver
        header = d.alloc(16)
        self.mem.write(header, struct.pack("<IIQ", kind, 0, sector))
        buffers = [(header, 8, False), (header + 8, 8, False)] if split_header else [(header, 16, False)]
        if out:
            addr = d.alloc(len(out))
            self.mem.write(addr, out)
            buffers.append((addr, len(out), False))
        data = d.alloc(in_len) if in_len else None
        if in_len:
            buffers.append((data, in_len, True))
        status = d.alloc(1)
        self.mem.write(status, b"\xff")
        buffers.append((status, 1, True))
        head = self.queue.add(buffers, indirect=indirect)
        used = self.queue.take_used()
        assert [h for h, _ in used] == [head]
        return self.mem.read(status, 1)[0], used[0][1], self.mem.read(data, in_len) if in_len else b""


def test_read(image):
    disk = Disk(VirtioBlock.open(image))
    status, used, data = disk.request(VIRTIO_BLK_T_IN, 3, in_len=8192)
    assert status == VIRTIO_BLK_S_OK
    assert used == 8192 + 1
    assert data == image.read_bytes()[3 * 512 : 3 * 512 + 8192]
    assert disk.device.metrics.bytes_read == 8192


def test_read_indirect_and_split_header(image):
    disk = Disk(VirtioBlock.open(image))
    status, _, data = disk.request(VIRTIO_BLK_T_IN, 1, in_len=1024, indirect=True, split_header=True)
    assert status == VIRTIO_BLK_S_OK
    assert data == image.read_bytes()[512:1536]


def test_write_lands_in_the_file(image):
    disk = Disk(VirtioBlock.open(image))
    payload = os.urandom(4096)
    status, used, _ = disk.request(VIRTIO_BLK_T_OUT, 8, out=payload)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[4096:8192] == payload
    assert disk.device.metrics.bytes_written == 4096


class RecordingImage(RawImage):
    """A real image that records the order of writes and syncs."""

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.log = []

    def write_from(self, views, offset, length):
        self.log.append("write")
        return super().write_from(views, offset, length)

    def flush(self):
        self.log.append("fsync")
        super().flush()

    def sync_data(self):
        self.log.append("fdatasync")
        super().sync_data()


def test_flush_is_durable_before_status(image):
    raw = RecordingImage(image)
    device = VirtioBlock(raw)
    disk = Disk(device)
    assert disk.features >> VIRTIO_BLK_F_FLUSH & 1
    disk.request(VIRTIO_BLK_T_OUT, 0, out=b"x" * 512)
    seen = []
    original = raw.flush

    def flush_then_check():
        # the status byte must not be OK yet while the flush runs
        seen.append(disk.mem.read(disk.driver._next_free - 1, 1))
        original()

    raw.flush = flush_then_check
    status, _, _ = disk.request(VIRTIO_BLK_T_FLUSH)
    assert status == VIRTIO_BLK_S_OK
    assert seen == [b"\xff"]
    assert raw.log == ["write", "fsync"]  # FLUSH negotiated: writes are write-back until FLUSH


def test_without_flush_writes_are_write_through(image):
    raw = RecordingImage(image)
    disk = Disk(VirtioBlock(raw), without=1 << VIRTIO_BLK_F_FLUSH)
    disk.request(VIRTIO_BLK_T_OUT, 0, out=b"y" * 512)
    assert raw.log == ["write", "fdatasync"]


def test_get_id(image):
    disk = Disk(VirtioBlock.open(image, serial="pyvmm-disk-0"))
    status, used, data = disk.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == VIRTIO_BLK_S_OK
    assert used == 21
    assert data == b"pyvmm-disk-0".ljust(20, b"\0")


def test_serial_truncated_to_20_bytes(image):
    disk = Disk(VirtioBlock.open(image, serial="x" * 30))
    _, _, data = disk.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert data == b"x" * 20


def test_config_space(image):
    disk = Disk(VirtioBlock.open(image))
    capacity, size_max, seg_max = struct.unpack("<QII", disk.driver.read_config(0, 16))
    assert capacity == IMAGE_SIZE // 512
    assert size_max == blk.SIZE_MAX
    assert seg_max == 254
    assert struct.unpack("<I", disk.driver.read_config(20, 4))[0] == 512


def test_read_only_refuses_writes(image):
    before = image.read_bytes()
    disk = Disk(VirtioBlock.open(image, read_only=True))
    assert disk.features >> VIRTIO_BLK_F_RO & 1
    assert not disk.features >> VIRTIO_BLK_F_DISCARD & 1
    status, used, _ = disk.request(VIRTIO_BLK_T_OUT, 0, out=b"z" * 512)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert image.read_bytes() == before
    status, _, data = disk.request(VIRTIO_BLK_T_IN, 0, in_len=512)
    assert status == VIRTIO_BLK_S_OK and data == before[:512]


@pytest.mark.parametrize(
    "kind, sector, kwargs",
    [
        (VIRTIO_BLK_T_IN, IMAGE_SIZE // 512, {"in_len": 512}),  # starts past the end
        (VIRTIO_BLK_T_IN, IMAGE_SIZE // 512 - 1, {"in_len": 1024}),  # runs past the end
        (VIRTIO_BLK_T_OUT, (1 << 64) - 1, {"out": b"a" * 512}),  # sector arithmetic overflow
        (VIRTIO_BLK_T_IN, 0, {"in_len": 100}),  # not a whole sector
    ],
)
def test_out_of_range_is_ioerr(image, kind, sector, kwargs):
    disk = Disk(VirtioBlock.open(image))
    status, used, _ = disk.request(kind, sector, **kwargs)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert disk.device.metrics.errors == 1
    assert not disk.driver.status & DEVICE_NEEDS_RESET


def test_unknown_request_is_unsupported(image):
    disk = Disk(VirtioBlock.open(image))
    status, _, _ = disk.request(99)
    assert status == VIRTIO_BLK_S_UNSUPP


class FailingImage(RawImage):
    """Every data transfer fails with ``code`` (a disk that went bad, a full file system)."""

    def __init__(self, path, code):
        super().__init__(path)
        self.code = code

    def read_into(self, views, offset, length):
        raise OSError(self.code, os.strerror(self.code))

    write_from = read_into

    def flush(self):
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("kind", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH])
def test_host_errors_become_ioerr(image, code, kind):
    disk = Disk(VirtioBlock(FailingImage(image, code)))
    kwargs = {"in_len": 512} if kind == VIRTIO_BLK_T_IN else {"out": b"b" * 512} if kind == VIRTIO_BLK_T_OUT else {}
    status, used, _ = disk.request(kind, 0, **kwargs)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert errno.errorcode[code] in disk.device.metrics.extra["last_host_error"]
    assert not disk.driver.status & DEVICE_NEEDS_RESET
    # the device keeps serving
    status, _, _ = disk.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == VIRTIO_BLK_S_OK


def test_real_enospc_on_a_full_file_system(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this host")
    # /dev/full: reads give zeroes, every write fails with ENOSPC (a character device: size 0),
    # so wrap it with a fake size to address one sector.
    raw = RawImage("/dev/full")
    raw.size = 4096
    disk = Disk(VirtioBlock(raw))
    status, _, _ = disk.request(VIRTIO_BLK_T_OUT, 0, out=b"c" * 512)
    assert status == VIRTIO_BLK_S_IOERR
    assert "ENOSPC" in disk.device.metrics.extra["last_host_error"]


def _segment(sector, count, flags=0):
    return struct.pack("<QII", sector, count, flags)


def _allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def test_discard_punches_a_hole(image):
    device = VirtioBlock.open(image)
    if not device.image.can_punch_hole:
        pytest.skip("the file system of the test image does not support PUNCH_HOLE")
    disk = Disk(device)
    assert disk.features >> VIRTIO_BLK_F_DISCARD & 1
    before = _allocated_bytes(image)
    status, _, _ = disk.request(VIRTIO_BLK_T_DISCARD, out=_segment(0, 128))  # 64 KiB
    assert status == VIRTIO_BLK_S_OK
    assert _allocated_bytes(image) < before
    assert image.read_bytes()[:65536] == bytes(65536)


def test_write_zeroes(image):
    device = VirtioBlock.open(image)
    if not (device.image.can_zero_range or device.image.can_punch_hole):
        pytest.skip("the file system of the test image supports neither ZERO_RANGE nor PUNCH_HOLE")
    disk = Disk(device)
    assert disk.features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    tail = image.read_bytes()[8192:]
    status, _, _ = disk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=_segment(8, 8) + _segment(0, 2, flags=1))
    assert status == VIRTIO_BLK_S_OK
    data = image.read_bytes()
    assert data[:1024] == bytes(1024) and data[4096:8192] == bytes(4096)
    assert data[8192:] == tail
    assert len(data) == IMAGE_SIZE


def test_discard_rules(image):
    device = VirtioBlock.open(image)
    if not device.image.can_punch_hole:
        pytest.skip("the file system of the test image does not support PUNCH_HOLE")
    disk = Disk(device)
    assert disk.request(VIRTIO_BLK_T_DISCARD, out=_segment(0, 8, flags=1))[0] == VIRTIO_BLK_S_UNSUPP
    assert disk.request(VIRTIO_BLK_T_DISCARD, out=_segment(IMAGE_SIZE // 512, 8))[0] == VIRTIO_BLK_S_IOERR
    assert disk.request(VIRTIO_BLK_T_DISCARD, out=b"short")[0] == VIRTIO_BLK_S_IOERR


def test_discard_not_negotiated_is_unsupported(image):
    disk = Disk(VirtioBlock.open(image), without=1 << VIRTIO_BLK_F_DISCARD)
    assert disk.request(VIRTIO_BLK_T_DISCARD, out=_segment(0, 8))[0] == VIRTIO_BLK_S_UNSUPP


def test_request_without_status_byte_does_not_crash(image):
    disk = Disk(VirtioBlock.open(image))
    header = disk.driver.alloc(16)
    disk.queue.add([(header, 16, False)])
    assert disk.queue.take_used()[0][1] == 0
    assert disk.device.metrics.errors == 1


def test_missing_image_is_a_clear_error(tmp_path):
    with pytest.raises(DeviceError, match="cannot open image .*nope.raw.*No such file"):
        VirtioBlock.open(tmp_path / "nope.raw")


def test_many_requests_in_one_kick(image):
    disk = Disk(VirtioBlock.open(image))
    q, d = disk.queue, disk.driver
    statuses = []
    for i in range(32):
        header, data, status = d.alloc(16), d.alloc(512), d.alloc(1)
        disk.mem.write(header, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i))
        q.add([(header, 16, False), (data, 512, True), (status, 1, True)], kick=False)
        statuses.append((status, data, i))
    q.kick()
    assert len(q.take_used()) == 32
    content = image.read_bytes()
    for status, data, i in statuses:
        assert disk.mem.read(status, 1) == b"\0"
        assert disk.mem.read(data, 512) == content[512 * i : 512 * (i + 1)]


def test_benchmark_smoke(tmp_path):
    """The benchmark runs end to end (every request completes with status OK; it exits 2 otherwise)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "virtio_blk.py"
    result = subprocess.run(
        [sys.executable, str(script), "--image-mib", "8", "--seconds", "0.05", "--rounds", "1", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode in (0, 1), result.stderr  # 1 = below the 50 % bar on a loaded machine
    for row in ("4Ki  read", "4Ki write", "64Ki  read", "64Ki write"):
        assert row in result.stdout
    assert "'errors': 0" in result.stdout


def test_flush_completes_only_after_the_image_fd_is_synced(image, monkeypatch):
    """A FLUSH's status byte turns OK only after fsync (F_FULLFSYNC on macOS) of the image's own fd:
    a flush that completed without syncing would pass every request-level check."""
    from pyvmm.host import fileio

    disk = Disk(VirtioBlock.open(image))
    disk.request(VIRTIO_BLK_T_OUT, 0, out=b"y" * 512)
    image_fd = disk.device.image.file.fd
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((fd, disk.mem.read(disk.driver._next_free - 1, 1)))  # the status byte, at that moment
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fileio.sys, "platform", "linux")  # the fsync path, whatever the host
    status, used, _ = disk.request(VIRTIO_BLK_T_FLUSH)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert [fd for fd, _ in synced] == [image_fd], "FLUSH completed without syncing the image"
    assert synced[0][1] == b"\xff", "the status was written before the image was synced"


def test_write_through_writes_are_data_synced_before_they_complete(image, monkeypatch):
    """Without FLUSH negotiated, every write must be on stable storage (fdatasync) before its status."""
    from pyvmm.host import fileio

    if not hasattr(os, "fdatasync"):
        pytest.skip("no fdatasync on this platform (write-through uses fsync: the FLUSH test covers it)")
    disk = Disk(VirtioBlock.open(image), without=1 << VIRTIO_BLK_F_FLUSH)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    monkeypatch.setattr(fileio.sys, "platform", "linux")
    status, _, _ = disk.request(VIRTIO_BLK_T_OUT, 0, out=b"z" * 512)
    assert status == VIRTIO_BLK_S_OK and synced == [disk.device.image.file.fd]


def test_a_second_writer_of_an_image_is_refused_with_its_name(image):
    first = VirtioBlock.open(image)
    try:
        with pytest.raises(DeviceError, match=rf"image '{image}' is in use by another VMM .*lock = false"):
            VirtioBlock.open(image)
        with pytest.raises(DeviceError, match=r"is open for writing in another VMM"):
            VirtioBlock.open(image, read_only=True)
    finally:
        first.close()
    VirtioBlock.open(image).close()  # the lock went with the first VMM's image


def test_readers_share_an_image_and_keep_writers_out(image):
    readers = [VirtioBlock.open(image, read_only=True) for _ in range(2)]
    try:
        with pytest.raises(DeviceError, match="is in use by another VMM"):
            VirtioBlock.open(image)
    finally:
        for reader in readers:
            reader.close()


def test_lock_false_opts_out(image):
    first = VirtioBlock.open(image)
    try:
        VirtioBlock.open(image, lock=False).close()
    finally:
        first.close()


def test_the_lock_conflicts_across_processes_too(image):
    import subprocess
    import sys

    holder = VirtioBlock.open(image)
    try:
        code = ("import sys; from pyvmm.devices.virtio.blk import VirtioBlock\n"
                "try:\n    VirtioBlock.open(sys.argv[1])\nexcept Exception as e:\n    print(e)\n")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True, text=True, timeout=60)
        assert "is in use by another VMM" in out.stdout, out.stdout + out.stderr
    finally:
        holder.close()


def test_a_new_image_under_a_running_drive_is_read_and_announced(image, tmp_path):
    """Firecracker's PATCH /drives path_on_host: the next request reads the new image, the capacity in
    the config space is the new size, and the driver gets a configuration-change interrupt."""
    from pyvmm.devices.virtio.mmio import INTERRUPT_CONFIG_CHANGE

    disk = Disk(VirtioBlock.open(image))
    transport = disk.driver.transport
    generation = transport.config_generation
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(2 * IMAGE_SIZE))
    new = RawImage(other)
    transport.update_device(lambda: disk.device.replace_image(new))
    assert struct.unpack("<Q", disk.driver.read_config(0, 8))[0] == 2 * IMAGE_SIZE // 512
    assert transport.config_generation == generation + 1
    assert transport.interrupt_status & INTERRUPT_CONFIG_CHANGE
    status, _, data = disk.request(VIRTIO_BLK_T_IN, 600, in_len=512)
    assert status == VIRTIO_BLK_S_OK and data == other.read_bytes()[600 * 512 : 601 * 512]
    with pytest.raises(DeviceError, match="must be writable"):
        disk.device.replace_image(RawImage(image, read_only=True))
