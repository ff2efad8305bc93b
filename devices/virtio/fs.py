"""virtio-fs (virtio 1.2, section 5.11): a host directory the guest mounts by its tag, served by a
vhost-user backend (virtiofsd) speaking FUSE over the device's queues.

Queues: 0 is the high-priority queue (FUSE_INTERRUPT, FORGET), 1..N the request queues.
Config space: ``tag`` (36 bytes of UTF-8, NUL-padded) and ``le32 num_request_queues``.
The guest mounts it with ``mount -t virtiofs TAG /mnt``. Everything on the queues is the
backend's; this model only describes the device (vhost_user/device.py does the rest).
"""

from __future__ import annotations

import struct

from pyvmm.devices.vhost_user.device import VhostUserDevice
from pyvmm.devices.vhost_user.frontend import Frontend
from pyvmm.errors import DeviceError

DEVICE_ID_FS = 26
TAG_SIZE = 36
QUEUE_SIZE = 256


def check_tag(tag: str) -> bytes:
    """The tag as the config space carries it; one-line DeviceError for one the guest could not use."""
    data = tag.encode()
    if not 1 <= len(data) <= TAG_SIZE or "\0" in tag:
        raise DeviceError(f"virtio-fs tag {tag!r} must be 1..{TAG_SIZE} bytes of UTF-8 without NUL")
    return data


class VirtioFs(VhostUserDevice):
    device_id = DEVICE_ID_FS

    def __init__(self, frontend: Frontend, tag: str, *, name: str = "virtio-fs", request_queues: int = 1,
                 queue_size: int = QUEUE_SIZE, backend_process=None):  # fmt: skip
        """``backend_process`` (e.g. host/virtiofsd.Virtiofsd) is stopped when the device closes."""
        self.tag = tag
        self._tag_bytes = check_tag(tag)
        self.request_queues = request_queues
        self.backend_process = backend_process
        super().__init__(frontend, name=name, queue_count=1 + request_queues, queue_size=queue_size)

    def config_space(self) -> bytes:
        return self._tag_bytes.ljust(TAG_SIZE, b"\0") + struct.pack("<I", self.request_queues)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.backend_process is not None:
                self.backend_process.stop()
