"""vhost-user: virtio queues served by another process (QEMU docs/interop/vhost-user.rst).

protocol.py is the sans-IO message codec, frontend.py the front end over a Unix socket
(requests, replies with timeouts, fd passing), device.py the virtio device model whose
queues the backend serves (devices/virtio/fs.py builds on it).
"""
