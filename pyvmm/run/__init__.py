"""Run a command in a fresh VM: ``pyvmm run -- CMD`` and ``VM.exec``.

The guest boots with the host's root file system shared read-only over virtio-fs,
an initramfs made on the fly (``initramfs.py``: busybox, the drivers, a small
init), and pyvmm's guest agent (``agent.py``, run by the host's Python from the
shared root) listening on vsock; the host side (``session.py``) asks the agent to
run commands and streams their input and output (``protocol.py``).
"""
