"""``pyvmm``: boot a VM from a config file, check accelerators, run the bundled demo.

Exit status of ``pyvmm boot``: 0 when the guest resets or powers off, the
byte a guest writes to the debug-exit port, 2 for a bad config or kernel,
1 (or another non-zero value) for a fatal VMM or guest error, 124 after
``--timeout``, and 128 + the signal's number when SIGINT (130), SIGTERM (143)
or SIGHUP (129) ended it: each is a clean stop (devices flushed and closed,
created TAP devices removed, the terminal restored), as QEMU does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from importlib import resources

from pyvmm import __version__
from pyvmm.errors import PyvmmError, one_line

log = logging.getLogger("pyvmm")

ESCAPE = b"\x01"  # Ctrl-A, then x: quit (as in QEMU)
#: signals that end ``pyvmm boot`` with a clean stop (what systemd, container runtimes and
#: orchestrators send); SIGINT is Python's KeyboardInterrupt
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):
    """A stop signal arrived: unwinds like KeyboardInterrupt, so every ``with``/``finally`` cleans up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _on_stop_signal(signum, frame) -> None:
    # One stop is enough: a second signal (systemd resends, a closing terminal sends SIGHUP
    # then SIGTERM) must not interrupt the clean-up the first one started.
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose - args.quiet)
    if args.command is None:
        parser.print_help()
        return 2
    previous = _install_stop_signals()
    try:
        return args.func(args)
    except PyvmmError as err:
        print(f"pyvmm: error: {one_line(str(err))}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("pyvmm: interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"pyvmm: terminated by {stop.name}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _install_stop_signals() -> dict:
    """Make SIGTERM/SIGHUP raise ``Terminated`` in the main thread (where Python runs handlers)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # nohup and parents that ignore SIGHUP keep it ignored
            previous[signum] = signal.signal(signum, _on_stop_signal)
    return previous


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvmm", description="A virtual machine monitor in Python.")
    parser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    common.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    parser.set_defaults(verbose=0, quiet=0, command=None)
    sub = parser.add_subparsers(dest="command")

    boot = sub.add_parser("boot", parents=[common], help="boot a VM described by a TOML config file")
    boot.add_argument("config", help="the VM's config file (TOML)")
    boot.add_argument("--accel", help='accelerator: "auto", a name, or a comma-separated preference list')
    boot.add_argument("--timeout", type=float, help="stop the VM after this many seconds (exit status 124)")
    boot.add_argument("--api-sock", help="serve Firecracker's API for this VM on this Unix socket (pause, resume, ...)")
    boot.add_argument("--gdb", metavar="ADDR", help='serve gdb on "HOST:PORT" or a Unix socket path (target remote ADDR)')
    boot.add_argument("--gdb-wait", action="store_true", help="hold the vCPUs before the first instruction until gdb continues")
    boot.add_argument("--journal", help="append the VM's lifecycle events here, one JSON object per line")
    boot.set_defaults(func=_cmd_boot)

    check = sub.add_parser("check", parents=[common], help="say which accelerators are usable here, and why not")
    check.set_defaults(func=_cmd_check)

    run = sub.add_parser("run", parents=[common], help="run a command in a fresh VM on the host's own root file system",
                         usage="pyvmm run [options] -- CMD [ARGS...]")  # fmt: skip
    run.add_argument("--kernel", help="kernel to boot (default: the one `pyvmm fetch-kernel` keeps)")
    run.add_argument("--accel", help="accelerator, as for boot")
    run.add_argument("--memory", type=int, default=512, help="guest RAM in MiB (default 512)")
    run.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    run.add_argument("--rw", action="store_true", help="share the host root writable (default: read-only)")
    run.add_argument("--cwd", help="directory the command runs in (default: the current one)")
    run.add_argument("--share", action="append", default=[], metavar="DIR", help="also share DIR writable (repeatable)")
    run.add_argument("--timeout", type=float, help="kill the command after this many seconds (exit status 124)")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    run.set_defaults(func=_cmd_run)

    fetch = sub.add_parser("fetch-kernel", parents=[common], help="fetch Debian's cloud kernel and busybox once (for run)")
    fetch.add_argument("--dest", help="cache folder (default: $PYVMM_KERNEL_DIR or ~/.cache/pyvmm/kernel)")
    fetch.add_argument("--force", action="store_true", help="fetch again even when the cache is current")
    fetch.set_defaults(func=_cmd_fetch_kernel)

    demo = sub.add_parser("demo", parents=[common], help="boot the bundled example guest")
    demo.add_argument("--accel", help="accelerator, as for boot")
    demo.set_defaults(func=_cmd_demo, timeout=60.0)
    return parser


def _cmd_run(args) -> int:
    from pathlib import Path

    from pyvmm.run import guest

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise PyvmmError("pyvmm run: give the command after --, e.g. pyvmm run -- uname -a")
    options = guest.RunOptions(kernel=Path(args.kernel) if args.kernel else None, accel=args.accel,
                               memory_mib=args.memory, vcpus=args.cpus, rw=args.rw,
                               shares=[Path(s) for s in args.share])  # fmt: skip
    uid, gid, groups = guest.host_user()
    cwd = os.path.abspath(args.cwd) if args.cwd else os.getcwd()
    with guest.start(options) as command_vm:
        log.info("start-up to the command: %.2f s", command_vm.startup_seconds)
        stdin = sys.stdin.buffer if sys.stdin is not None and not sys.stdin.closed else None
        result = command_vm.exec(argv, stdin=stdin, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                                 env=dict(os.environ), cwd=cwd, uid=uid, gid=gid, groups=groups,
                                 timeout=args.timeout)  # fmt: skip
    if result.timed_out:
        print(f"pyvmm: {argv[0]} killed after {args.timeout} s", file=sys.stderr)
        return 124
    return result.status


def _cmd_fetch_kernel(args) -> int:
    from pathlib import Path

    from pyvmm.run import debian

    dest = Path(args.dest) if args.dest else debian.default_cache()
    debian.fetch(dest, force=args.force)
    print(f"pyvmm: kernel ready in {dest}")
    return 0


def _setup_logging(verbosity: int) -> None:
    env = os.environ.get("PYVMM_LOG", "").upper()
    if env in ("DEBUG", "INFO", "WARNING", "ERROR"):
        level = getattr(logging, env)
    else:
        level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG if verbosity > 1 else logging.CRITICAL)
    logging.basicConfig(level=level, format="pyvmm: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _cmd_check(args) -> int:
    from pyvmm import accel

    any_usable = False
    for probe in accel.probe_all():
        mark = "usable" if probe.usable else "unusable"
        print(f"{probe.name:7} {mark}: {probe.reason}")
        for note in probe.notes:
            print(f"        note: {note}")
        any_usable |= probe.usable
    return 0 if any_usable else 1


def _cmd_boot(args) -> int:
    from pyvmm.api import VM

    accel = args.accel.split(",") if args.accel else None
    vm = VM.from_config(args.config, accel=accel, echo=sys.stdout.buffer, journal=args.journal)
    if args.gdb or args.gdb_wait:
        from pyvmm.errors import ConfigError
        from pyvmm.gdb.errors import GdbError
        from pyvmm.gdb.server import parse_address

        address = args.gdb or vm.config.debug.gdb
        if address is None:
            raise ConfigError("--gdb-wait needs --gdb ADDR (or [debug] gdb in the config)", key="--gdb-wait")
        try:
            parse_address(address)
        except GdbError as err:
            raise ConfigError(str(err), key="--gdb") from err
        vm.config.debug.gdb, vm.config.debug.gdb_wait = address, args.gdb_wait or vm.config.debug.gdb_wait
    return _run(vm, args.timeout, api_sock=args.api_sock)


def _cmd_demo(args) -> int:
    from pyvmm.api import VM

    kernel = resources.files("pyvmm") / "guests" / "hello.elf"
    with resources.as_file(kernel) as path:
        vm = VM.from_dict(
            {"machine": {"memory_mib": 32}, "boot": {"kernel": str(path), "cmdline": "console=ttyS0"}},
            accel=args.accel.split(",") if args.accel else None,
            echo=sys.stdout.buffer,
        )
        return _run(vm, args.timeout)


def _run(vm, timeout: float | None, api_sock: str | None = None) -> int:
    start = time.monotonic()
    with vm:
        machine = vm.machine  # build: config and kernel errors surface here (the builder logs the choice)
        if api_sock:
            vm.serve_api(api_sock)
        stdin = _StdinForwarder(vm) if sys.stdin is not None and sys.stdin.isatty() else None
        try:
            if stdin:
                stdin.start()
            vm.start()
            deadline = None if timeout is None else start + timeout
            status = None
            while status is None:
                # Wait in slices so Ctrl-C (when stdin is not raw) is handled promptly.
                slice_ = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
                status = vm.wait(slice_)
                if status is None and deadline is not None and time.monotonic() >= deadline:
                    status = machine.stop(f"timed out after {timeout} s", code=124)
                    for line in machine.vcpu_positions():  # where a hung guest was
                        log.info("%s", line)
                if status is None and stdin and stdin.quit_requested:
                    status = machine.stop("quit from the console (Ctrl-A x)")
        except KeyboardInterrupt:
            status = machine.stop("interrupted (Ctrl-C)", code=130)
        except Terminated as stop:
            status = machine.stop(f"terminated by {stop.name}", code=128 + stop.signum)
        finally:
            if stdin:
                stdin.restore()
        elapsed = time.monotonic() - start
        log.info("VM ended after %.2f s: %s (status %d)", elapsed, status.reason, status.code)
        counts = machine.exit_counts()
        if counts:
            log.info("exits: %s", ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items(), key=lambda kv: -kv[1])))
        for name, metrics in machine.device_metrics().items():
            log.info("%s: %s", name, ", ".join(f"{k} {v}" for k, v in metrics.items() if k != "device"))
        if status.error is not None:
            print(f"pyvmm: error: {one_line(str(status.error))}", file=sys.stderr)
        return status.code


class EscapeFilter:
    """Keys typed -> bytes for the guest, sans-IO: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A."""

    def __init__(self):
        self.escaped = False
        self.quit = False

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            ch = bytes([byte])
            if self.quit:
                break
            if self.escaped:
                self.escaped = False
                if ch in (b"x", b"X"):
                    self.quit = True
                    break
                out += ch
            elif ch == ESCAPE:
                self.escaped = True
            else:
                out += ch
        return bytes(out)


class _StdinForwarder:
    """Host terminal -> guest serial, in raw mode (host/console.py), through ``EscapeFilter``."""

    def __init__(self, vm):
        from pyvmm.host.console import Keyboard

        self.vm = vm
        self.keyboard = Keyboard(sys.stdin)
        self.filter = EscapeFilter()

    @property
    def quit_requested(self) -> bool:
        return self.filter.quit

    def start(self) -> None:
        self.keyboard.enter()
        threading.Thread(target=self._pump, name="stdin", daemon=True).start()

    def _pump(self) -> None:
        while not self.filter.quit:
            data = self.keyboard.read()
            if not data:
                return
            out = self.filter.feed(data)
            if out:
                self.vm.console.write(out)

    def restore(self) -> None:
        self.keyboard.restore()
