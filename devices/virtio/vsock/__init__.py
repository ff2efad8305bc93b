"""virtio-vsock (virtio 1.2, section 5.10): guest AF_VSOCK streams bridged to host Unix sockets,
with Firecracker's host-side convention.

``packet`` is the header codec, ``connection`` one stream's protocol state and
credit (both sans-IO), ``device`` the ``VirtioVsock`` device with its host
sockets.
"""

from pyvmm.devices.virtio.vsock.device import DEVICE_ID_VSOCK, VirtioVsock, check_guest_cid

__all__ = ["DEVICE_ID_VSOCK", "VirtioVsock", "check_guest_cid"]
