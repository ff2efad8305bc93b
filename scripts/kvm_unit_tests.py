#!/usr/bin/env python3
"""Run kvm-unit-tests' x86 suite on pyvmm (interpreter; KVM with the fallback) and QEMU TCG.

    scripts/kvm_unit_tests.py /path/to/kvm-unit-tests [--jobs 2] [--timeout 60] [--only NAME ...]
                              [--runners interp,kvm,tcg] [--markdown docs/conformance.md]

The checkout must be built here (``./configure && make``); it is fetched by hand and never part
of this repository (CI cannot reach it). Every entry of ``x86/unittests.cfg`` runs the way the
suite's own ``run_tests.sh`` would run it: its ``smp``, its ``test_args`` as the command line, its
``qemu_params`` for QEMU (the memory size ``-m`` for pyvmm too), its ``timeout``; entries for
i386, in the ``nodefault`` group, for another ``accel``, or whose ``check`` files do not hold are
skipped with that reason. pyvmm boots the ``.flat`` (a multiboot ELF) through ``pyvmm boot`` with
an environment module (``NR_CPUS``, ``MEMSIZE``, ``TEST_DEVICE=0``) as the suite's ``-initrd``
gives it, and with ``[debug] test_device = true``: pyvmm's model of QEMU's pc-testdev
(devices/legacy/testdev.py), whose MMIO window the emulator test runs its operands through (the
suite maps it whatever TEST_DEVICE says; TEST_DEVICE=0 only skips what needs KVM's test quirks,
such as syscall's compat-mode SYSCALL, which an Intel CPU refuses with #UD). The result of each run: PASS, FAIL (with the failing
sub-tests), SKIP (with the reason), TIMEOUT; then the totals.

The suite's exit protocol (lib/x86: ``exit(code)`` writes ``code`` to port 0xf4): pyvmm's status
is that byte; QEMU's isa-debug-exit exits with ``(code << 1) | 1``. ``report_summary`` returns 0
(all passed), 1 (a failure) or 38 (everything skipped: 77 once QEMU has shifted it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TIMEOUT = 60
DEFAULT_MEMORY_MIB = 128  # QEMU's default -m, which the suite's entries assume
RUNNERS = ("interp", "kvm", "tcg")
TITLES = {"interp": "pyvmm interp", "kvm": "pyvmm KVM+fallback", "tcg": "QEMU TCG"}
SKIP_STATUS = 77 >> 1  # report_summary's "all skipped": QEMU's (38 << 1) | 1 makes autotools' 77


# ---------------------------------------------------------------------------
# x86/unittests.cfg


@dataclass
class Entry:
    name: str
    file: str = ""
    smp: int = 1
    test_args: str = ""
    qemu_params: str = ""
    arch: str = ""
    accel: str = ""
    groups: tuple[str, ...] = ()
    check: tuple[str, ...] = ()
    timeout: int | None = None

    def memory_mib(self) -> int:
        """The ``-m`` of qemu_params in MiB (QEMU's suffixes: none = MiB, k, m, g, t)."""
        words = shlex.split(self.qemu_params)
        for flag, value in zip(words, words[1:]):
            if flag == "-m":
                match = re.fullmatch(r"(\d+)([kKmMgGtT]?)[bB]?", value.split(",")[0])
                if not match:
                    raise ValueError(f"[{self.name}] qemu_params: cannot read the memory size {value!r}")
                number, unit = int(match.group(1)), match.group(2).lower()
                return {"": number, "m": number, "k": number // 1024, "g": number << 10, "t": number << 20}[unit]
        return DEFAULT_MEMORY_MIB


def parse_unittests_cfg(text: str) -> list[Entry]:
    """The entries of a kvm-unit-tests ``unittests.cfg`` (``[name]`` then ``key = value`` lines;
    the older ``extra_params`` holds QEMU's options and ``-append 'args'`` together)."""
    entries: list[Entry] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = re.fullmatch(r"\[(.+)\]", line)
        if section:
            entries.append(Entry(section.group(1).strip()))
            continue
        key, sep, value = line.partition("=")
        if not sep or not entries:
            raise ValueError(f"unittests.cfg line {number}: expected [name] or key = value, got {raw!r}")
        key, value, entry = key.strip(), value.strip(), entries[-1]
        if key == "file":
            entry.file = value
        elif key == "smp":
            entry.smp = int(value)
        elif key == "test_args":
            entry.test_args = _unquote(value)
        elif key == "qemu_params":
            entry.qemu_params = value
        elif key == "extra_params":
            entry.qemu_params, entry.test_args = _split_append(value)
        elif key == "arch":
            entry.arch = value
        elif key == "accel":
            entry.accel = value
        elif key == "groups":
            entry.groups = tuple(value.split())
        elif key == "check":
            entry.check = tuple(value.split())
        elif key == "timeout":
            entry.timeout = int(re.match(r"\d+", value).group())
        # other keys (machine, disabled_if, ...) do not change an x86 run here
    return entries


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _split_append(extra: str) -> tuple[str, str]:
    """``extra_params`` -> (QEMU options, the ``-append`` argument)."""
    match = re.search(r"-append\s+('[^']*'|\"[^\"]*\"|\S+)", extra)
    if not match:
        return extra, ""
    return (extra[: match.start()] + extra[match.end() :]).strip(), _unquote(match.group(1))


def skip_reason(entry: Entry, runner: str, suite: Path, arch: str = "x86_64") -> str | None:
    """Why ``run_tests.sh`` would not run ``entry`` on ``runner`` (None: it runs)."""
    if entry.arch and entry.arch != arch:
        return f"{entry.arch} only"
    if "nodefault" in entry.groups:
        return "manual run only (nodefault)"
    runner_accel = "tcg" if runner in ("tcg", "interp") else "kvm"
    if entry.accel and entry.accel != runner_accel:
        return f"{entry.accel} only"
    for condition in entry.check:
        path, _, expected = condition.partition("=")
        try:
            actual = Path(path).read_text().strip()
        except OSError:
            actual = None
        if actual != expected:
            return f"{path} is not {expected}"
    if not (suite / "x86" / entry.file).is_file():
        return f"x86/{entry.file} not built"
    return None


# ---------------------------------------------------------------------------
# a run's result


@dataclass
class Result:
    status: str  # PASS, FAIL, SKIP, TIMEOUT
    detail: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def cell(self) -> str:
        if not self.detail:
            return self.status
        shown = "; ".join(self.detail[:3]) + (f"; +{len(self.detail) - 3} more" if len(self.detail) > 3 else "")
        return f"{self.status} ({shown})"


def classify(suite_status: int | None, output: str, errors: str = "") -> Result:
    """A run's result from the suite's status (``report_summary``'s value, None: timed out), its
    console output and the VMM's errors."""
    fails = [line[len("FAIL: ") :].strip() for line in output.splitlines() if line.startswith("FAIL: ")]
    skips = [line[len("SKIP: ") :].strip() for line in output.splitlines() if line.startswith("SKIP: ")]
    if suite_status is None:
        return Result("TIMEOUT", fails)
    if suite_status == 0:
        return Result("PASS")
    if suite_status == SKIP_STATUS:
        reason = skips[-1:] or [line for line in output.splitlines() if line.strip()][-1:]
        return Result("SKIP", reason)
    if suite_status == 1 and fails:
        return Result("FAIL", fails)
    vmm_error = [line.strip() for line in errors.splitlines() if "error" in line.lower()][-1:]
    last = [line.strip() for line in output.splitlines() if line.strip()][-1:]
    return Result("FAIL", fails + (vmm_error or [f"status {suite_status}"] + [f"last output: {x}" for x in last]))


# ---------------------------------------------------------------------------
# running one entry


def expand_args(test_args: str) -> str:
    """The command-line text, with backticks expanded as run_tests.sh's eval does."""
    if "`" not in test_args and "$" not in test_args:
        return test_args
    return subprocess.run(["bash", "-c", f'printf %s "{test_args}"'], capture_output=True, text=True, check=True).stdout


def run_pyvmm(entry: Entry, suite: Path, accel: str, timeout: int, workdir: Path) -> Result:
    memory = entry.memory_mib()
    env_file = workdir / f"{entry.name}-{accel}.env"
    env_file.write_text(f"NR_CPUS={entry.smp}\nMEMSIZE={memory}\nTEST_DEVICE=0\n")
    config = workdir / f"{entry.name}-{accel}.toml"
    cmdline = expand_args(entry.test_args)
    config.write_text(
        f'[machine]\nvcpus = {entry.smp}\nmemory_mib = {memory}\naccel = "{accel}"\nfallback = true\n'
        f'[boot]\nkernel = "{suite / "x86" / entry.file}"\ninitrd = "{env_file}"\ncmdline = {_toml_string(cmdline)}\n'
        f"[debug]\ntest_device = true\n"
    )
    command = [sys.executable, "-m", "pyvmm", "boot", "--timeout", str(timeout), str(config)]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout + 30)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        result = classify(None, output)
    else:
        status = None if done.returncode == 124 else done.returncode
        if status == 1 and "pyvmm: error" in done.stderr:
            status = -1  # the VMM stopped the guest (a triple fault, a bad exit): not the suite's 1
        result = classify(status, done.stdout, done.stderr)
    result.seconds = time.monotonic() - started
    return result


def run_qemu(entry: Entry, suite: Path, timeout: int, workdir: Path, qemu: str = "qemu-system-x86_64") -> Result:
    env_file = workdir / f"{entry.name}-tcg.env"
    env_file.write_text(f"NR_CPUS={entry.smp}\nMEMSIZE={entry.memory_mib()}\n")
    command = (f"{qemu} --no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard -device pc-testdev "
               f"-device isa-debug-exit,iobase=0xf4,iosize=0x4 -display none -serial stdio -device pci-testdev "
               f"-machine accel=tcg -kernel {shlex.quote(str(suite / 'x86' / entry.file))} -smp {entry.smp} "
               f"{entry.qemu_params} -initrd {shlex.quote(str(env_file))} "
               f"-append {shlex.quote(expand_args(entry.test_args))}")  # fmt: skip
    started = time.monotonic()
    try:
        done = subprocess.run(["timeout", "--foreground", "-k", "5", str(timeout), "bash", "-c", command],
                              capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)  # fmt: skip
    except OSError as err:
        return Result("SKIP", [f"cannot run {qemu}: {err.strerror}"])
    elapsed = time.monotonic() - started
    if done.returncode in (124, 137):
        result = classify(None, done.stdout)
    elif done.returncode == 1 and not done.stdout.strip() and done.stderr.startswith(f"{os.path.basename(qemu)}:"):
        result = Result("SKIP", [done.stderr.strip().splitlines()[0]])  # QEMU refused the options
    elif done.returncode & 1:
        result = classify(done.returncode >> 1, done.stdout, done.stderr)  # isa-debug-exit's (code << 1) | 1
    else:
        result = classify(-1, done.stdout, done.stderr or f"QEMU exited with {done.returncode}")
    result.seconds = elapsed
    return result


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------
# the table


def markdown_table(entries: list[Entry], results: dict[tuple[str, str], Result], runners: tuple[str, ...]) -> str:
    lines = ["| test | " + " | ".join(TITLES[r] for r in runners) + " |", "|---" * (len(runners) + 1) + "|"]
    for entry in entries:
        cells = [results[(entry.name, r)].cell().replace("|", "\\|") for r in runners]
        lines.append(f"| {entry.name} | " + " | ".join(cells) + " |")
    lines.append("")
    for runner in runners:
        counts = {s: 0 for s in ("PASS", "FAIL", "SKIP", "TIMEOUT")}
        for entry in entries:
            counts[results[(entry.name, runner)].status] += 1
        lines.append(f"- **{TITLES[runner]}**: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines) + "\n"


def suite_commit(suite: Path) -> str:
    head = subprocess.run(["git", "-C", str(suite), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() if head.returncode == 0 else "unknown (not a git checkout)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path, help="a built kvm-unit-tests checkout")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT,
                        help="seconds per run when the entry names none (default %(default)s)")
    parser.add_argument("--max-timeout", type=int, default=180, help="cap on an entry's own timeout")
    parser.add_argument("--only", nargs="*", default=None, help="these entries only")
    parser.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated: interp,kvm,tcg")
    parser.add_argument("--markdown", type=Path, help="also write the table, dated, to this file")
    args = parser.parse_args()

    cfg = args.suite / "x86" / "unittests.cfg"
    try:
        entries = parse_unittests_cfg(cfg.read_text())
    except (OSError, ValueError) as err:
        print(f"kvm_unit_tests: {cfg}: {err}", file=sys.stderr)
        return 2
    if args.only:
        unknown = set(args.only) - {e.name for e in entries}
        if unknown:
            print(f"kvm_unit_tests: no such entries: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        entries = [e for e in entries if e.name in args.only]
    runners = tuple(args.runners.split(","))
    if not set(runners) <= set(RUNNERS):
        print(f"kvm_unit_tests: --runners: expected some of {','.join(RUNNERS)}", file=sys.stderr)
        return 2

    results: dict[tuple[str, str], Result] = {}
    work = []
    for entry in entries:
        for runner in runners:
            reason = skip_reason(entry, runner, args.suite)
            if reason:
                results[(entry.name, runner)] = Result("SKIP", [reason])
            else:
                work.append((entry, runner))

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyvmm-kut-") as tmp, \
            concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # fmt: skip
        def run(entry: Entry, runner: str) -> Result:
            timeout = min(entry.timeout or args.timeout, args.max_timeout)
            if runner == "tcg":
                return run_qemu(entry, args.suite, timeout, Path(tmp))
            return run_pyvmm(entry, args.suite, runner, timeout, Path(tmp))

        futures = {pool.submit(run, entry, runner): (entry.name, runner) for entry, runner in work}
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            results[key] = future.result()
            print(f"{key[0]:<40} {TITLES[key[1]]:<20} {results[key].cell()[:100]} "
                  f"({results[key].seconds:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip

    table = markdown_table(entries, results, runners)
    print(table)
    if args.markdown:
        header = (f"Generated by `scripts/kvm_unit_tests.py` on {datetime.date.today()} "
                  f"({time.monotonic() - started:.0f} s, {args.jobs} jobs) from kvm-unit-tests commit "
                  f"`{suite_commit(args.suite)}`, x86_64 build, QEMU TCG: "
                  f"`{_qemu_version()}`.\n\n")  # fmt: skip
        text = args.markdown.read_text() if args.markdown.exists() else ""
        marker_start, marker_end = "<!-- table: start -->", "<!-- table: end -->"
        block = f"{marker_start}\n{header}{table}{marker_end}"
        if marker_start in text and marker_end in text:
            text = text[: text.index(marker_start)] + block + text[text.index(marker_end) + len(marker_end) :]
        else:
            text = text + ("\n" if text else "") + block + "\n"
        args.markdown.write_text(text)
    return 0


def _qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "not installed"
    return out.splitlines()[0] if out else "unknown"


if __name__ == "__main__":
    sys.exit(main())
