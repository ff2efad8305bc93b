"""Disk image files: positional vectored I/O, durability, hole punching and locks, on every OS.

``ImageFile`` moves data straight between the file and memoryviews (no
intermediate buffer): ``os.preadv``/``os.pwritev`` where the platform has them
(Linux, the BSDs), ``os.pread``/``os.pwrite`` per view otherwise (macOS before
Python 3.12 builds them without the vectored calls), and ``readinto``/``write``
at a seek position on Windows, which has no positional calls at all (one
request at a time per image: the device serves a drive's queue on one thread).

Durability: ``flush`` is ``fsync`` (``F_FULLFSYNC`` on macOS, where plain
fsync leaves data in the drive's cache), ``sync_data`` is ``fdatasync`` where
it exists. Hole punching and zeroing ranges are Linux ``fallocate`` modes,
offered only where the image's file system accepts them.

Locks (``lock``): an exclusive lock for a writable image, a shared one for a
read-only image, so a second VMM (or a QEMU using flock) cannot write an image
a running guest has mounted. POSIX: ``flock`` on the open file description (it
conflicts between two opens in one process too); Windows: ``LockFileEx`` on a
byte far beyond any data, so it never blocks the VMM's own I/O.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

IOV_MAX = 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
F_FULLFSYNC = 51  # macOS <fcntl.h>
WINDOWS_LOCK_OFFSET = 0x7FFF_FFFF_0000_0000  # LockFileEx region: one byte, past any image


#: flock errors that mean "this file system has no locks", not "someone holds it"
NO_LOCKS_HERE = frozenset(getattr(errno, name) for name in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EINVAL")
                          if hasattr(errno, name))  # fmt: skip


class LockConflict(OSError):
    """Another open of the image holds a conflicting lock."""


_fallocate = None


def _libc_fallocate():
    global _fallocate
    if _fallocate is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate
        function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        function.restype = ctypes.c_int

        def call(fd: int, mode: int, offset: int, length: int) -> None:
            if function(fd, mode, offset, length) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))

        _fallocate = call
    return _fallocate


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if not sys.platform.startswith("linux"):
        raise OSError(errno.EOPNOTSUPP, "fallocate modes need Linux")
    _libc_fallocate()(fd, mode, offset, length)


class ImageFile:
    """An open image. ``read_only`` opens it for reading only."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False):
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        self.fd = os.open(self.path, flags)
        self._locked = False
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            self.is_block_device = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        except OSError:
            os.close(self.fd)
            raise
        self._positional = hasattr(os, "pread")
        self._vectored = hasattr(os, "preadv") and hasattr(os, "pwritev")

    # --- data ---------------------------------------------------------------
    def read_into(self, views: list, offset: int, length: int) -> None:
        """Fill ``views`` (``length`` bytes in all) from ``offset``; a short file is an I/O error."""
        if self._vectored:
            _full_transfer(os.preadv, self.fd, views, offset, length)
        else:
            self._each_view(views, offset, reading=True)

    def write_from(self, views: list, offset: int, length: int) -> None:
        if self._vectored:
            _full_transfer(os.pwritev, self.fd, views, offset, length)
        else:
            self._each_view(views, offset, reading=False)

    def _each_view(self, views: list, offset: int, *, reading: bool) -> None:
        for view in views:
            done = 0
            while done < len(view):
                part = view[done:]
                if self._positional:
                    count = _pread_into(self.fd, part, offset) if reading else os.pwrite(self.fd, part, offset)
                else:
                    os.lseek(self.fd, offset, os.SEEK_SET)
                    count = _read_into(self.fd, part) if reading else os.write(self.fd, part)
                if count <= 0:
                    raise OSError(errno.EIO, f"short transfer at byte {offset} of the image")
                done += count
                offset += count

    # --- durability -----------------------------------------------------------
    def flush(self) -> None:
        """Everything written so far is on stable storage."""
        if sys.platform == "darwin":
            try:
                import fcntl

                fcntl.fcntl(self.fd, F_FULLFSYNC)
                return
            except (ImportError, OSError):
                pass  # a file system without F_FULLFSYNC: plain fsync is the best there is
        os.fsync(self.fd)

    def sync_data(self) -> None:
        if hasattr(os, "fdatasync") and sys.platform != "darwin":
            os.fdatasync(self.fd)
        else:
            self.flush()

    # --- holes ----------------------------------------------------------------
    def punch_hole(self, offset: int, length: int) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)

    def probe_fallocate(self) -> tuple[bool, bool]:
        """(punch hole, zero range): which modes the image's file system accepts."""
        if self.read_only or self.is_block_device or not sys.platform.startswith("linux"):
            return False, False
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            scratch = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except (OSError, AttributeError):
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

    # --- locks ----------------------------------------------------------------
    def lock(self) -> bool:
        """Exclusive for a writable image, shared for a read-only one; ``LockConflict`` when taken.

        False when this platform offers no file locks at all (then nothing is locked).
        """
        exclusive = not self.read_only
        try:
            if os.name == "nt":
                _windows_lock(self.fd, exclusive)
            else:
                try:
                    import fcntl
                except ImportError:
                    return False
                fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK) or getattr(err, "winerror", 0) == 33:
                raise LockConflict(err.errno, err.strerror or "locked") from err
            if err.errno in NO_LOCKS_HERE:
                return False  # NFS without lockd, file systems that refuse flock: like no locks at all
            raise
        self._locked = True
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the lock goes with the last reference to the open file description
            self.fd = -1


def _accepts(fd: int, mode: int, offset: int) -> bool:
    try:
        fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, offset, 4096)
        return True
    except OSError:
        return False


def _pread_into(fd: int, view, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def _read_into(fd: int, view) -> int:
    data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def _full_transfer(op, fd: int, views: list, offset: int, length: int) -> None:
    """Run preadv/pwritev until all ``length`` bytes of ``views`` are done; no progress is an I/O error."""
    done = op(fd, views if len(views) <= IOV_MAX else views[:IOV_MAX], offset)
    while done < length:  # rare: a short transfer, or more views than one call takes
        if done < 0:
            raise OSError(errno.EIO, f"short transfer at byte {offset} of the image")
        count = op(fd, skip(views, done)[:IOV_MAX], offset + done)
        if count <= 0:
            raise OSError(errno.EIO, f"short transfer at byte {offset + done} of the image")
        done += count


def skip(views: list, count: int) -> list:
    """``views`` without their first ``count`` bytes."""
    for i, view in enumerate(views):
        if count < len(view):
            return ([view[count:]] if count else [view]) + views[i + 1 :]
        count -= len(view)
    return []


def _windows_lock(fd: int, exclusive: bool) -> None:
    """LockFileEx(LOCKFILE_FAIL_IMMEDIATELY [| LOCKFILE_EXCLUSIVE_LOCK]) on one byte past any data."""
    import ctypes
    import msvcrt
    from ctypes import wintypes

    class OVERLAPPED(ctypes.Structure):
        _fields_ = [("Internal", ctypes.c_void_p), ("InternalHigh", ctypes.c_void_p), ("Offset", wintypes.DWORD),
                    ("OffsetHigh", wintypes.DWORD), ("hEvent", wintypes.HANDLE)]  # fmt: skip

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    overlapped = OVERLAPPED(0, 0, WINDOWS_LOCK_OFFSET & 0xFFFFFFFF, WINDOWS_LOCK_OFFSET >> 32, None)
    flags = 0x1 | (0x2 if exclusive else 0)  # LOCKFILE_FAIL_IMMEDIATELY, LOCKFILE_EXCLUSIVE_LOCK
    handle = msvcrt.get_osfhandle(fd)
    if not kernel32.LockFileEx(wintypes.HANDLE(handle), flags, 0, 1, 0, ctypes.byref(overlapped)):
        code = ctypes.get_last_error()
        raise OSError(errno.EACCES if code == 33 else errno.EIO, ctypes.FormatError(code), None, code)
