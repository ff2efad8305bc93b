#!/usr/bin/env python3
"""Host <-> guest transfers: virtio-vsock and virtio-fs against the same transfers over virtio-net.

One command VM (``pyvmm.run.guest``: the host root over virtio-fs, vsock, plus a virtio-net NIC
on a TAP the script creates with 10.77.0.1/24 on the host side and 10.77.0.2 in the guest). The
guest side of every stream transfer is the same small Python program (``PEER`` below, run by the
host's Python from the shared root), so only the transport differs:

* guest -> host and host -> guest, SIZE bytes: over vsock (the guest connects to CID 2, which pyvmm
  bridges to the Unix socket ``<uds_path>_<port>``) and over TCP on virtio-net; timed on the host
  from the first byte to the last;
* latency: 200 one-byte round trips, the host echoing; median;
* file reads: a SIZE file read in the guest (``dd``, caches dropped first) from the virtio-fs root,
  against the same file sent over TCP.

Needs root (TAP, virtiofsd). ``sudo python3 benchmarks/guest_io.py [--mib 32] [--accel interp]``
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST_IP, GUEST_IP, TAP = "10.77.0.1", "10.77.0.2", "pyvmmbench0"
VSOCK_PORT, TCP_PORT = 5200, 5201
ROUND_TRIPS = 200

PEER = r"""
import socket, sys, time
family, host, port, mode, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
s = socket.socket(socket.AF_VSOCK if family == "vsock" else socket.AF_INET, socket.SOCK_STREAM)
s.connect((int(host), port) if family == "vsock" else (host, port))
chunk = bytes(65536)
if mode == "send":
    left = size
    while left > 0:
        left -= s.send(chunk[: min(left, len(chunk))])
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
elif mode == "recv":
    got = 0
    while got < size:
        data = s.recv(65536)
        if not data:
            break
        got += len(data)
    s.sendall(b"k")
elif mode == "echo":
    for _ in range(size):
        s.sendall(s.recv(1))
s.close()
"""


class Listener:
    """One host-side connection for one transfer, on a thread; records first/last byte times."""

    def __init__(self, server: socket.socket, mode: str, size: int):
        self.server, self.mode, self.size = server, mode, size
        self.result: float | list[float] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.server.accept()
            with conn:
                if self.mode == "send":  # the guest sends: receive and time
                    got, first = 0, None
                    while got < self.size:
                        data = conn.recv(1 << 20)
                        if not data:
                            break
                        first = first or time.perf_counter()
                        got += len(data)
                    self.result = (self.size / (time.perf_counter() - first)) if got == self.size else None
                    conn.sendall(b"k")
                elif self.mode == "recv":  # the guest receives: send, time until its ack
                    start, chunk, left = time.perf_counter(), bytes(1 << 20), self.size
                    while left > 0:
                        left -= conn.send(chunk[: min(left, len(chunk))])
                    conn.recv(1)
                    self.result = self.size / (time.perf_counter() - start)
                else:  # echo: the host times round trips it starts
                    times = []
                    for _ in range(self.size):
                        start = time.perf_counter()
                        conn.sendall(b"x")
                        conn.recv(1)
                        times.append(time.perf_counter() - start)
                    self.result = times
        except BaseException as err:  # reported by the main thread
            self.error = err

    def wait(self, timeout: float = 600):
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


def transfer(vm, peer: Path, family: str, server: socket.socket, mode: str, size: int):
    listener = Listener(server, mode, size)
    target = ("2", str(VSOCK_PORT)) if family == "vsock" else (HOST_IP, str(TCP_PORT))
    result = vm.exec(["python3", "-I", "-S", str(peer), family, *target, mode, str(size)], timeout=600)
    if result.status != 0:
        raise RuntimeError(f"guest peer {family} {mode} failed: {result.stderr.decode(errors='replace')[-800:]}")
    return listener.wait()


def guest_read_mbps(vm, path: Path) -> float:
    vm.exec(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
    result = vm.exec(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
    match = re.search(rb"copied, ([\d.]+) s", result.stderr)
    if result.status != 0 or not match:
        raise RuntimeError(f"dd in the guest failed: {result.stderr.decode(errors='replace')}")
    return path.stat().st_size / float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32, help="bytes per transfer, in MiB")
    parser.add_argument("--accel", default="interp")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (a TAP device, virtiofsd)")
        return 2
    from pyvmm.run import guest

    size = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-io-") as tmp:
        work = Path(tmp)
        peer = work / "peer.py"
        peer.write_text(PEER)
        data_file = work / "data.bin"
        data_file.write_bytes(os.urandom(size))
        options = guest.RunOptions(accel=args.accel, tap=TAP, address=f"{GUEST_IP}/24", memory_mib=512)
        with guest.start(options) as command_vm:
            vm = command_vm.vm
            subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP], check=True)
            subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
            uds = str(command_vm.uds_path)
            vsock_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            vsock_server.bind(f"{uds}_{VSOCK_PORT}")
            vsock_server.listen(1)
            tcp_server = socket.create_server((HOST_IP, TCP_PORT))
            servers = {"vsock": vsock_server, "virtio-net (TCP)": tcp_server}
            rows = []
            for name, server in servers.items():
                family = "vsock" if name == "vsock" else "tcp"
                out = transfer(vm, peer, family, server, "send", size)
                into = transfer(vm, peer, family, server, "recv", size)
                rtt = statistics.median(transfer(vm, peer, family, server, "echo", ROUND_TRIPS))
                rows.append((name, out, into, rtt))
            print(f"{'transport':18} {'guest->host MB/s':>17} {'host->guest MB/s':>17} {'round trip µs':>14}")
            for name, out, into, rtt in rows:
                print(f"{name:18} {out / 1e6:>17.1f} {into / 1e6:>17.1f} {rtt * 1e6:>14.0f}")
            (v_out, v_in, v_rtt), (n_out, n_in, n_rtt) = (r[1:] for r in rows)
            print(f"vsock / virtio-net: guest->host {v_out / n_out:.2f}x, host->guest {v_in / n_in:.2f}x, "
                  f"round trip {v_rtt / n_rtt:.2f}x (time)")  # fmt: skip
            fs_rate = guest_read_mbps(vm, data_file)
            net_rate = transfer(vm, peer, "tcp", tcp_server, "recv", size)
            print(f"file of {args.mib} MiB into the guest: virtio-fs read {fs_rate / 1e6:.1f} MB/s, "
                  f"over virtio-net {net_rate / 1e6:.1f} MB/s ({fs_rate / net_rate:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
