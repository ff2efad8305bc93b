"""Shared fixtures: where test assets live, and what this host can run."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import settings

# CI replays the same examples every run (a red run must mean a regression, not a new draw);
# developers' runs draw new ones. PYVMM_FUZZ_EXAMPLES raises the count for a long run by hand.
settings.register_profile("dev", max_examples=300)
settings.register_profile("ci", max_examples=300, derandomize=True, print_blob=True)
settings.register_profile("long", max_examples=int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "20000")))
settings.load_profile("long" if os.environ.get("PYVMM_FUZZ_EXAMPLES") else "ci" if os.environ.get("CI") else "dev")

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "tests" / "guests"
ASSETS = Path(os.environ.get("PYVMM_TEST_ASSETS", ROOT / "tests" / "assets"))


SLOW_TEST_TIMEOUT = 1500  # seconds; the ten-boot test takes ~6 minutes on these 2-core machines


def pytest_collection_modifyitems(config, items):
    """Long end-to-end boots (marker ``slow``) get a longer per-test timeout than the default."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))


FAKES_BOOT = ROOT / "tests" / "fakes" / "boot"
#: child VMM processes a test started (test_firecracker_process.spawn); any left running is killed
CHILDREN: list = []


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test():
    yield
    while CHILDREN:
        child = CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)


@pytest.fixture(params=["kvm", "interp", "hvf", "whpx"])
def backend(request, monkeypatch):
    """Each accelerator in turn; skipped with the probe's reason where it is not usable.

    Hypervisor.framework and WHPX run against their fakes (tests/fakes), in this process and in
    ``pyvmm`` child processes (tests/fakes/boot/sitecustomize.py).
    """
    from pyvmm import accel

    if request.param in ("hvf", "whpx"):
        from fakes import install

        _, undo = install(request.param)
        request.addfinalizer(undo)
        monkeypatch.setenv("PYVMM_FAKE_PLATFORM", request.param)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKES_BOOT), os.environ.get("PYTHONPATH")])))
    probe = accel.probe(request.param)
    if not probe.usable:
        pytest.skip(f"{request.param} not usable here: {probe.reason}")
    return request.param


def pyvmm_boot(config, *args, timeout: float, env=None, prefix=()) -> subprocess.CompletedProcess:
    """``pyvmm boot CONFIG ARGS`` in a child process (optionally after ``prefix``, e.g. ip netns exec)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "pyvmm", "boot", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def kvm_skip_reason() -> str | None:
    """None when KVM is usable here, else why not (pyvmm's own probe)."""
    from pyvmm import accel

    probe = accel.probe("kvm")
    return None if probe.usable else f"KVM not usable here: {probe.reason}"


@pytest.fixture
def kernel_file(tmp_path):
    """A minimal file that passes the config's kernel-format sniff (an ELF header)."""
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(60))
    return path


def wait_for(predicate, timeout: float = 3.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def loop():
    """A started pyvmm event loop, closed after the test."""
    from pyvmm.vmm.events import EventLoop

    loop = EventLoop("test-events")
    loop.start()
    yield loop
    loop.close()
