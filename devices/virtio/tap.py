"""A TAP interface as a virtio-net backend (Linux /dev/net/tun; elsewhere a one-line error).

Opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a 12-byte vnet header, so
each read or write is exactly one frame in the layout virtio-net uses, and
non-blocking for the event loop. Offloads stay off (TUNSETOFFLOAD 0): the
host kernel segments and checksums before a frame reaches the guest.

If the interface does not exist and we are root, it is created (persistent,
through pyroute2) and removed again on ``close()``; an interface that already
existed is left alone.
"""

from __future__ import annotations

import errno
import os
import struct
import sys

from pyvmm.devices.virtio.net import NET_HDR_SIZE
from pyvmm.errors import DeviceError

TUN_DEVICE = "/dev/net/tun"
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
# _IOW('T', nr, int)
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8


class TapBackend:
    def __init__(self, name: str):
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise DeviceError(f"tap {name!r}: interface names are 1 to {IFNAMSIZ - 1} bytes without '/'")
        self.name = name
        self.created = False
        self.fd = -1
        if not sys.platform.startswith("linux"):
            raise DeviceError(f"tap {name!r}: TAP networking needs Linux (/dev/net/tun); this host is {sys.platform}, "
                              "where [[net]] devices are not supported yet")  # fmt: skip
        import fcntl  # Linux only, like the rest of this backend

        if not os.path.exists(f"/sys/class/net/{name}") and os.geteuid() == 0:
            self._create()
        try:
            self.fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            ifreq = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifreq)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", NET_HDR_SIZE))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)
        except OSError as err:
            self.close()
            raise DeviceError(f"tap {name!r}: cannot open it through {TUN_DEVICE}: {_why(err)}") from err

    def _create(self) -> None:
        try:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                ipr.link("add", ifname=self.name, kind="tuntap", mode="tap")
                index = ipr.link_lookup(ifname=self.name)[0]
                ipr.link("set", index=index, state="up")
        except Exception as err:  # pyroute2 raises NetlinkError, OSError, ImportError ...
            raise DeviceError(f"tap {self.name!r}: does not exist and could not be created: {err}") from err
        self.created = True

    def fileno(self) -> int:
        return self.fd

    def read_frame(self, into: memoryview) -> int | None:
        try:
            return os.readv(self.fd, [into])
        except BlockingIOError:
            return None

    def write_frame(self, buffers: list) -> None:
        os.writev(self.fd, buffers)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.created:
            self.created = False
            try:
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    ipr.link("del", ifname=self.name)
            except Exception:
                pass  # already gone


def _why(err: OSError) -> str:
    if err.errno in (errno.EPERM, errno.EACCES):
        return f"{err.strerror} (needs CAP_NET_ADMIN, or a tap owned by this user)"
    if err.errno in (errno.ENOENT, errno.ENODEV):
        return f"{err.strerror} (is the tun module loaded?)"
    return err.strerror or str(err)
