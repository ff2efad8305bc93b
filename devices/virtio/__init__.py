"""VirtIO device models (blk, net, rng) over the virtio-mmio transport.

Sans-IO in the h11 sense: the split virtqueue (``queue.py``) and the device
models take guest memory as an argument and never signal anything themselves;
the transport (``mmio.py``) owns registers, status and interrupts, so every
piece is testable against a ``bytearray`` with no hypervisor
(``mock_driver.py`` plays the guest).

Wiring a device into a VM (what the builder does)::

    loop = EventLoop()                                    # pyvmm.vmm.events, one per VM
    for n, device in enumerate([VirtioBlock.open(path, read_only=ro, serial=None),
                                VirtioNet(TapBackend("tap0"), mac=None),
                                VirtioRng()]):
        base = layout.VIRTIO_MMIO_BASE + n * layout.VIRTIO_MMIO_SIZE
        irq = layout.virtio_irqs()[n]
        transport = VirtioMmio(device, memory, IrqLine(irq, vm.set_irq_line))
        mmio_bus.insert(transport, base, layout.VIRTIO_MMIO_SIZE)
        notify_fds = transport.attach(loop)               # one eventfd per queue
        # optional with KVM: KVM_IOEVENTFD(notify_fds[i], base + mmio.QUEUE_NOTIFY, len 4, datamatch i)
        cmdline += " " + cmdline_entry(base, irq)         # virtio_mmio.device=4K@0x...:irq
    loop.start()                                          # before the vCPUs run
    ...
    transport.metrics()                                   # per-device counters for -v
    transport.close(); loop.close()                       # at shutdown (closes images, removes created taps)
"""
