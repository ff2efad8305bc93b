"""VirtIO device models (blk, net, rng) over the virtio-mmio transport.

Sans-IO in the h11 sense: the split virtqueue (``queue.py``) and the device
models take guest memory as an argument and never signal anything themselves;
the transport (``mmio.py``) owns registers, status and interrupts, so every
piece is testable against a ``bytearray`` with no hypervisor.
"""
