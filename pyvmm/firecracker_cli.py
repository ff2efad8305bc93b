"""``pyvmm-firecracker``: Firecracker's process interface, so tools that spawn ``firecracker`` can run pyvmm.

    pyvmm-firecracker --api-sock /tmp/fc.sock [--config-file vm.json] [--no-api] [--id ID]
                      [--level Info] [--log-path F] [--metrics-path F] [--accel interp] [--cpu portable]

As Firecracker: the API on a Unix socket (``--api-sock``, default
/run/firecracker.socket), or none with ``--no-api`` (then ``--config-file`` is
required); a ``--config-file`` (Firecracker's JSON) configures and starts the
microVM at once; the guest's serial console is this process's standard output
and its input is standard input; the process exits when the microVM ends, with
status 0 when the guest rebooted or powered off. Firecracker has no accelerator
choice: pyvmm's is ``auto`` unless ``--accel`` or ``PYVMM_ACCEL`` names one; ``--cpu
portable`` (or ``PYVMM_CPU``) shows the guest only what every backend of this host can
run, so its snapshots restore on any of them.
Flags of Firecracker that change nothing here (seccomp, start-time and payload
limits) are accepted and logged once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

from pyvmm import __version__
from pyvmm.errors import ConfigError, PyvmmError, one_line

log = logging.getLogger("pyvmm.firecracker")

DEFAULT_SOCKET = "/run/firecracker.socket"
#: Firecracker flags accepted without effect (name -> takes a value)
IGNORED_FLAGS = {"--no-seccomp": False, "--seccomp-filter": True, "--start-time-us": True, "--start-time-cpu-us": True,
                 "--parent-cpu-time-us": True, "--http-api-max-payload-size": True, "--mmds-size-limit": True,
                 "--show-level": False, "--show-log-origin": False, "--module": True}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvmm-firecracker",
                                     description="Firecracker's command line and API, served by pyvmm.")  # fmt: skip
    parser.add_argument("--api-sock", default=DEFAULT_SOCKET, help="the API's Unix socket path")
    parser.add_argument("--config-file", help="Firecracker JSON configuration: configure and start at once")
    parser.add_argument("--no-api", action="store_true", help="serve no API (needs --config-file)")
    parser.add_argument("--id", default="anonymous-instance", help="the microVM's id (GET / reports it)")
    parser.add_argument("--level", default="Warning", choices=["Error", "Warning", "Info", "Debug", "Trace", "Off"])
    parser.add_argument("--log-path", help="write the log here instead of standard error")
    parser.add_argument("--metrics-path", help="append metrics here, one JSON object per line")
    parser.add_argument("--boot-timer", action="store_true", help="accepted; not applied")
    parser.add_argument("--accel", default=os.environ.get("PYVMM_ACCEL"),
                        help='pyvmm: accelerator ("auto", a name, or a comma-separated list); default $PYVMM_ACCEL or auto')
    parser.add_argument("--cpu", choices=["host", "portable"], default=os.environ.get("PYVMM_CPU", "host"),
                        help="pyvmm: the CPUID shown to the guest; \"portable\" lets a snapshot restore on every "
                             "backend of this host (default $PYVMM_CPU or host)")
    parser.add_argument("--version", action="version", version=f"Firecracker v1.7.0 (pyvmm {__version__})")
    for flag, takes_value in IGNORED_FLAGS.items():
        if takes_value:
            parser.add_argument(flag, default=None, help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, action="store_const", const=True, default=None, help=argparse.SUPPRESS)
    return parser


def _setup_logging(level: str, path: str | None) -> None:
    from pyvmm.server.firecracker import LOG_LEVELS

    python_level = LOG_LEVELS[level]
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s:%(levelname)s] %(message)s"))
    root = logging.getLogger("pyvmm")
    root.handlers[:] = [handler]
    root.setLevel(python_level or logging.CRITICAL + 1)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.level, args.log_path)
    for flag in IGNORED_FLAGS:
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None:
            log.info("%s is accepted but has no effect in pyvmm", flag)
    if args.no_api and not args.config_file:
        print("pyvmm-firecracker: error: --no-api needs --config-file", file=sys.stderr)
        return 1
    from pyvmm import accel
    from pyvmm.cli import Terminated, _install_stop_signals

    accel.prepare_main_thread()  # the microVM is created on an API request's thread
    previous = _install_stop_signals()
    try:
        return _serve(args)
    except PyvmmError as err:
        print(f"pyvmm-firecracker: error: {one_line(str(err))}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130
    except Terminated as stop:
        return 128 + stop.signum
    finally:
        import signal

        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serve(args) -> int:
    from pyvmm.config import parse_accel
    from pyvmm.server.firecracker import FaultError
    from pyvmm.server.routes import FirecrackerApi

    accel = parse_accel(args.accel.split(","), source="--accel/PYVMM_ACCEL", key="accel") if args.accel else None
    vms = []

    def start_vm(vm_config):
        from pyvmm.api import VM

        vm = VM(vm_config, echo=sys.stdout.buffer)
        vm.start()
        _forward_stdin(vm)
        vms.append(vm)
        return vm

    def restore_vm(snapshot_path, mem_path, resume, track_dirty_pages=None):
        from pyvmm.api import VM

        vm = VM.restore(snapshot_path, mem_path, accel=accel, resume=resume, echo=sys.stdout.buffer,
                        track_dirty_pages=track_dirty_pages)  # fmt: skip
        _forward_stdin(vm)
        vms.append(vm)
        return vm

    api = FirecrackerApi(start_vm, instance_id=args.id, accel=accel, restore_vm=restore_vm, cpu=args.cpu)
    server = None
    try:
        if args.metrics_path:
            api._put_metrics({"metrics_path": args.metrics_path})
        if args.config_file:
            try:
                with open(args.config_file, encoding="utf-8") as f:
                    data = json.load(f)
                from pyvmm.server.firecracker import FirecrackerConfig

                api.config = FirecrackerConfig.from_json(data)
            except FaultError as err:
                raise ConfigError(str(err), file=args.config_file) from err
            except (OSError, ValueError) as err:
                raise ConfigError(f"cannot read the configuration: {err}", file=args.config_file) from err
        if not args.no_api:
            from pyvmm.server.http import ApiServer

            server = ApiServer(args.api_sock, api)
        if args.config_file:
            response = api.handle("PUT", "/actions", b'{"action_type": "InstanceStart"}')
            if response.status != 204:
                raise ConfigError(response.body["fault_message"], file=args.config_file)
        while not api.started.wait(0.5):
            pass
        vm = vms[0]
        status = None
        while status is None:
            status = vm.wait(0.5)
        log.info("microVM ended: %s (status %d)", status.reason, status.code)
        if status.error is not None:
            print(f"pyvmm-firecracker: error: {one_line(str(status.error))}", file=sys.stderr)
        return status.code
    finally:
        if server is not None:
            server.close()
        api.close()
        for vm in vms:
            vm.close()


def _forward_stdin(vm) -> None:
    """Standard input -> the guest's serial console, as Firecracker does (raw mode on a terminal)."""
    stdin = sys.stdin
    if stdin is None:
        return
    if stdin.isatty():
        from pyvmm.cli import _StdinForwarder

        forwarder = _StdinForwarder(vm)
        forwarder.start()
        vm.controller.subscribe(lambda event: forwarder.restore() if event.kind == "stopped" else None)
        return

    def pump() -> None:
        stream = stdin.buffer
        while True:
            data = stream.read1(4096) if hasattr(stream, "read1") else stream.read(1)
            if not data:
                return
            vm.console.write(data)

    threading.Thread(target=pump, name="stdin", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
