"""virtio-blk (virtio 1.2, section 5.2) over a raw image file.

Data moves straight between the file and guest memory: vectored positional
I/O on the descriptors' memoryviews (host/fileio.py), no intermediate buffer. A
request's status byte is written only after its data is where it belongs:
FLUSH is ``fsync`` before OK, and when the driver did not negotiate FLUSH
every write is ``fdatasync``-ed before it completes (write-through).
DISCARD and WRITE_ZEROES are offered only when the image's file system
accepts ``fallocate(PUNCH_HOLE / ZERO_RANGE)``, probed when the image opens.
Each image is locked while the VM runs (exclusive when writable, shared when
read-only): a second VMM opening it for writing gets a one-line error.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

from pyvmm.devices.ratelimit import RateLimiterConfig
from pyvmm.devices.virtio.device import DEVICE_ID_BLOCK, DeviceContext, VirtioDevice
from pyvmm.devices.virtio.throttle import Throttle
from pyvmm.errors import DeviceError
from pyvmm.host.fileio import ImageFile, LockConflict, skip

log = logging.getLogger("pyvmm.virtio.blk")

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

class RawImage:
    """The host side of a disk: a raw image file (or block device), what it supports, and its lock.

    ``lock``: take the image's lock (exclusive when writable, shared when read-only) so
    that a second VMM cannot open it for writing while this guest uses it.
    """

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False, lock: bool = True):
        self.path = os.fspath(path)
        self.read_only = read_only
        self.lock_requested = lock
        try:
            self.file = ImageFile(self.path, read_only=read_only)
        except OSError as err:
            raise DeviceError(f"virtio-blk: cannot open image {self.path!r}: {err.strerror}") from err
        try:
            if lock and not self.file.lock():
                log.warning("virtio-blk: this platform has no file locks: image %s is not protected against a "
                            "second VMM writing it", self.path)  # fmt: skip
            self.size = self.file.size
            self.can_punch_hole, self.can_zero_range = self.file.probe_fallocate()
        except LockConflict as err:
            self.file.close()
            holder = "is open for writing in another VMM" if read_only else "is in use by another VMM"
            raise DeviceError(
                f"virtio-blk: image {self.path!r} {holder} (its lock is held); two guests writing one image "
                "corrupt it. Stop the other VM, or set lock = false for this drive to share it anyway"
            ) from err
        except OSError as err:
            self.file.close()
            raise DeviceError(f"virtio-blk: cannot use image {self.path!r}: {err.strerror}") from err

    def read_into(self, views: list, offset: int, length: int) -> None:
        self.file.read_into(views, offset, length)

    def write_from(self, views: list, offset: int, length: int) -> None:
        self.file.write_from(views, offset, length)

    def flush(self) -> None:
        self.file.flush()

    def sync_data(self) -> None:
        self.file.sync_data()

    def discard(self, offset: int, length: int) -> None:
        self.file.punch_hole(offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        if self.can_punch_hole and (unmap or not self.can_zero_range):
            self.discard(offset, length)  # a hole reads back as zeroes
        else:
            self.file.zero_range(offset, length)

    def close(self) -> None:
        self.file.close()


class VirtioBlock(VirtioDevice):
    device_id = DEVICE_ID_BLOCK
    name = "virtio-blk"

    def __init__(self, image: RawImage, *, serial: str | None = None, queue_size: int = QUEUE_SIZE,
                 rate_limiter: RateLimiterConfig | None = None):  # fmt: skip
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
        #: per request: one op, and the data bytes of a read or write (Firecracker's accounting)
        self.throttle = Throttle(self, rate_limiter, lambda: self.process_queue(0))
        self.metrics.extra["throttled"] = 0

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False, serial: str | None = None,
             lock: bool = True, rate_limiter: RateLimiterConfig | None = None) -> VirtioBlock:  # fmt: skip
        return cls(RawImage(path, read_only=read_only, lock=lock), serial=serial, rate_limiter=rate_limiter)

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

    def replace_image(self, image: RawImage) -> None:
        """Swap the backing image (Firecracker's PATCH /drives path_on_host): the new size is in the
        config space at once; the transport tells the driver (a configuration-change interrupt).
        Call under the transport's lock, so no request is being served meanwhile."""
        if image.read_only != self.read_only:
            image.close()
            raise DeviceError(f"virtio-blk: the new image {image.path!r} must be {'read-only' if self.read_only else 'writable'}"
                              " as the drive was negotiated")  # fmt: skip
        old, self.image = self.image, image
        self.capacity = image.size >> SECTOR_SHIFT
        self._config = self._build_config()
        old.close()

    def activate(self, context: DeviceContext) -> None:
        super().activate(context)
        # Without FLUSH the driver assumes completed writes are durable.
        self._write_through = not context.has(VIRTIO_BLK_F_FLUSH)

    def process_queue(self, index: int) -> None:
        if self.throttle.drain(index, self._data_bytes, self.handle_request):
            self.metrics.extra["throttled"] = self.throttle.throttled

    def set_rate_limiter(self, config: RateLimiterConfig) -> None:
        """A new limit from now on (Firecracker's PATCH /drives rate_limiter); call under the transport's lock."""
        self.throttle.configure(config)

    def reset(self) -> None:
        super().reset()
        self.throttle.cancel()

    def close(self) -> None:
        self.throttle.cancel()
        self.image.close()

    @staticmethod
    def _data_bytes(chain) -> int:
        """The bytes a read or write request moves (0 for the others and for malformed headers)."""
        readable = chain.readable
        if not readable or len(readable[0]) < 4:
            return 0
        kind = int.from_bytes(readable[0][:4], "little")
        if kind == VIRTIO_BLK_T_IN:
            return max(0, chain.writable_len - 1)
        if kind == VIRTIO_BLK_T_OUT:
            return max(0, chain.readable_len - _HEADER.size)
        return 0

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
            data_in = skip(readable, _HEADER.size)

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
