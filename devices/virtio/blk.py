"""virtio-blk (virtio 1.2, section 5.2) over a raw image file.

Data moves straight between the file and guest memory: ``os.preadv`` /
``os.pwritev`` on the descriptors' memoryviews, no intermediate buffer. A
request's status byte is written only after its data is where it belongs:
FLUSH is ``fsync`` before OK, and when the driver did not negotiate FLUSH
every write is ``fdatasync``-ed before it completes (write-through).
DISCARD and WRITE_ZEROES are offered only when the image's file system
accepts ``fallocate(PUNCH_HOLE / ZERO_RANGE)``, probed when the image opens.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct

from pyvmm.devices.virtio.device import DEVICE_ID_BLOCK, DeviceContext, VirtioDevice
from pyvmm.errors import DeviceError

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

# Request types.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

# Status byte values.
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

# Feature bits.
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_WRITE_ZEROES_F_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

QUEUE_SIZE = 256
SIZE_MAX = 1 << 20  # largest single data segment
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEGMENTS = 32
DISCARD_ALIGNMENT_SECTORS = 8  # 4 KiB, the usual file-system block

_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
# Config space up to and including write_zeroes_may_unmap (+3 bytes padding).
_CONFIG = struct.Struct("<QII4xI8xBxHIIIIIB3x")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_IOV_MAX = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class RawImage:
    """The host side of a disk: a raw image file (or block device) and what it supports."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False):
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as err:
            raise DeviceError(f"virtio-blk: cannot open image {self.path!r}: {err.strerror}") from err
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            st = os.fstat(self.fd)
            if read_only or stat.S_ISBLK(st.st_mode):
                self.can_punch_hole = self.can_zero_range = False
            else:
                self.can_punch_hole, self.can_zero_range = self._probe_fallocate()
        except OSError as err:
            os.close(self.fd)
            raise DeviceError(f"virtio-blk: cannot use image {self.path!r}: {err.strerror}") from err

    def _probe_fallocate(self) -> tuple[bool, bool]:
        """Which fallocate modes the image's file system accepts, tried on a scratch file beside it."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            scratch = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            return self._probe_past_end()
        try:
            os.pwrite(scratch, bytes(8192), 0)
            return _accepts(scratch, FALLOC_FL_PUNCH_HOLE, 0), _accepts(scratch, FALLOC_FL_ZERO_RANGE, 0)
        finally:
            os.close(scratch)

    def _probe_past_end(self) -> tuple[bool, bool]:
        # No scratch file possible (read-only directory): try beyond the end of the image, where a
        # hole changes nothing; a zeroed range there is punched out again.
        end = -(-self.size // 4096) * 4096
        punch = _accepts(self.fd, FALLOC_FL_PUNCH_HOLE, end)
        zero = _accepts(self.fd, FALLOC_FL_ZERO_RANGE, end)
        if zero and punch:
            _accepts(self.fd, FALLOC_FL_PUNCH_HOLE, end)
        return punch, zero

    # Vectored I/O straight from/into the views; loops over short transfers.
    def read_into(self, views: list, offset: int, length: int) -> None:
        _full_transfer(os.preadv, self.fd, views, offset, length)

    def write_from(self, views: list, offset: int, length: int) -> None:
        _full_transfer(os.pwritev, self.fd, views, offset, length)

    def flush(self) -> None:
        os.fsync(self.fd)

    def sync_data(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        if self.can_punch_hole and (unmap or not self.can_zero_range):
            self.discard(offset, length)  # a hole reads back as zeroes
        else:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _accepts(fd: int, mode: int, offset: int) -> bool:
    try:
        fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, offset, 4096)
        return True
    except OSError:
        return False


def _full_transfer(op, fd: int, views: list, offset: int, length: int) -> None:
    """Run preadv/pwritev until all ``length`` bytes of ``views`` are done; no progress is an I/O error."""
    done = op(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
    while done < length:  # rare: a short transfer, or more views than one call takes
        if done < 0:
            raise OSError(errno.EIO, f"short transfer at byte {offset} of the image")
        count = op(fd, _skip(views, done)[:_IOV_MAX], offset + done)
        if count <= 0:
            raise OSError(errno.EIO, f"short transfer at byte {offset + done} of the image")
        done += count


def _skip(views: list, count: int) -> list:
    """``views`` without their first ``count`` bytes."""
    for i, view in enumerate(views):
        if count < len(view):
            return ([view[count:]] if count else [view]) + views[i + 1 :]
        count -= len(view)
    return []


class VirtioBlock(VirtioDevice):
    device_id = DEVICE_ID_BLOCK
    name = "virtio-blk"

    def __init__(self, image: RawImage, *, serial: str | None = None, queue_size: int = QUEUE_SIZE):
        super().__init__()
        self.image = image
        self.read_only = image.read_only
        self.queue_sizes = (queue_size,)
        self.capacity = image.size >> SECTOR_SHIFT  # a partial last sector is not exposed
        serial_bytes = (serial if serial is not None else os.path.basename(image.path)).encode()
        self.serial = serial_bytes[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.seg_max = queue_size - 2  # header and status take two descriptors of a chain
        self._write_through = True
        self._config = self._build_config()

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False, serial: str | None = None) -> VirtioBlock:
        return cls(RawImage(path, read_only=read_only), serial=serial)

    def device_features(self) -> int:
        features = super().device_features()
        features |= 1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
        features |= 1 << VIRTIO_BLK_F_FLUSH
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        if self.image.can_punch_hole:
            features |= 1 << VIRTIO_BLK_F_DISCARD
        if self.image.can_punch_hole or self.image.can_zero_range:
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        return features

    def _build_config(self) -> bytes:
        return _CONFIG.pack(
            self.capacity,
            SIZE_MAX,
            self.seg_max,
            SECTOR_SIZE,  # blk_size
            0,  # writeback (no CONFIG_WCE)
            1,  # num_queues
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            DISCARD_ALIGNMENT_SECTORS,
            MAX_DISCARD_SECTORS,  # max_write_zeroes_sectors
            MAX_DISCARD_SEGMENTS,  # max_write_zeroes_seg
            int(self.image.can_punch_hole),  # write_zeroes_may_unmap
        )

    def config_space(self) -> bytes:
        return self._config

    def activate(self, context: DeviceContext) -> None:
        super().activate(context)
        # Without FLUSH the driver assumes completed writes are durable.
        self._write_through = not context.has(VIRTIO_BLK_F_FLUSH)

    def process_queue(self, index: int) -> None:
        self.drain(index, self.handle_request)

    def close(self) -> None:
        self.image.close()

    # --- one request --------------------------------------------------
    def handle_request(self, chain) -> int:
        """Serve one request chain; returns the number of bytes written into it."""
        metrics = self.metrics
        metrics.requests += 1
        writable = chain.writable
        if not writable or not chain.writable_len:
            metrics.errors += 1  # no status byte: nothing can be reported
            return 0
        last = writable[-1]
        status = last[len(last) - 1 :]
        data_out = writable[:-1] if len(last) == 1 else writable[:-1] + [last[:-1]]
        readable = chain.readable
        if chain.readable_len < _HEADER.size:
            return self._complete(status, VIRTIO_BLK_S_IOERR)
        first = readable[0]
        if len(first) >= _HEADER.size:
            kind, _reserved, sector = _HEADER.unpack_from(first)
            data_in = readable[1:] if len(first) == _HEADER.size else [first[_HEADER.size :]] + readable[1:]
        else:
            kind, _reserved, sector = _HEADER.unpack(b"".join(bytes(v) for v in readable)[: _HEADER.size])
            data_in = _skip(readable, _HEADER.size)

        try:
            if kind == VIRTIO_BLK_T_IN:
                length = chain.writable_len - 1
                if not self._in_range(sector, length):
                    return self._complete(status, VIRTIO_BLK_S_IOERR)
                self.image.read_into(data_out, sector << SECTOR_SHIFT, length)
                metrics.bytes_read += length
                status[0] = VIRTIO_BLK_S_OK
                return length + 1
            if kind == VIRTIO_BLK_T_OUT:
                length = chain.readable_len - _HEADER.size
                if self.read_only or not self._in_range(sector, length):
                    return self._complete(status, VIRTIO_BLK_S_IOERR)
                self.image.write_from(data_in, sector << SECTOR_SHIFT, length)
                if self._write_through:
                    self.image.sync_data()
                metrics.bytes_written += length
                status[0] = VIRTIO_BLK_S_OK
                return 1
            if kind == VIRTIO_BLK_T_FLUSH:
                if not self.read_only:
                    self.image.flush()
                status[0] = VIRTIO_BLK_S_OK
                return 1
            if kind == VIRTIO_BLK_T_GET_ID:
                return self._get_id(data_out, status)
            if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                return self._discard_or_zero(kind, data_in, status)
        except OSError as err:
            # EIO, ENOSPC, ... from the host: the guest sees an I/O error, the VMM carries on.
            self.metrics.extra["last_host_error"] = f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror}"
            return self._complete(status, VIRTIO_BLK_S_IOERR)
        return self._complete(status, VIRTIO_BLK_S_UNSUPP)

    def _complete(self, status, value: int) -> int:
        if value != VIRTIO_BLK_S_OK:
            self.metrics.errors += 1
        status[0] = value
        return 1

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector + (length >> SECTOR_SHIFT) <= self.capacity

    def _get_id(self, data_out: list, status) -> int:
        written = 0
        for view in data_out:
            chunk = self.serial[written : written + len(view)]
            view[: len(chunk)] = chunk
            written += len(chunk)
            if written == VIRTIO_BLK_ID_BYTES:
                break
        status[0] = VIRTIO_BLK_S_OK
        return written + 1

    def _discard_or_zero(self, kind: int, data_in: list, status) -> int:
        discard = kind == VIRTIO_BLK_T_DISCARD
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.context.has(feature):
            return self._complete(status, VIRTIO_BLK_S_UNSUPP)
        payload = b"".join(bytes(v) for v in data_in)
        count = len(payload) // _SEGMENT.size
        if not count or len(payload) % _SEGMENT.size or count > MAX_DISCARD_SEGMENTS:
            return self._complete(status, VIRTIO_BLK_S_IOERR)
        segments = [_SEGMENT.unpack_from(payload, i * _SEGMENT.size) for i in range(count)]
        for sector, sectors, flags in segments:
            allowed = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_F_UNMAP
            if flags & ~allowed:
                return self._complete(status, VIRTIO_BLK_S_UNSUPP)
            if self.read_only or sectors > MAX_DISCARD_SECTORS or not self._in_range(sector, sectors << SECTOR_SHIFT):
                return self._complete(status, VIRTIO_BLK_S_IOERR)
        for sector, sectors, flags in segments:
            offset, length = sector << SECTOR_SHIFT, sectors << SECTOR_SHIFT
            if not length:
                continue
            if discard:
                self.image.discard(offset, length)
            else:
                self.image.write_zeroes(offset, length, unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_F_UNMAP))
                self.metrics.bytes_written += length
        if self._write_through:
            self.image.sync_data()
        status[0] = VIRTIO_BLK_S_OK
        return 1
