"""virtio-fs pieces that need no backend: ``[[share]]`` validation, shared guest RAM, the device's
config space, and the snapshot refusal."""

from __future__ import annotations

import mmap
import os
from types import SimpleNamespace

import pytest

from conftest import GUESTS
from pyvmm.config import config_from_dict
from pyvmm.errors import ConfigError, GuestMemoryError
from pyvmm.vmm.memory import GuestMemory


def share_config(tmp_path, *shares):
    return config_from_dict({"boot": {"kernel": str(GUESTS / "hello.elf")}, "share": list(shares)}, base_dir=tmp_path,
                            source="vm.toml")  # fmt: skip


def test_shares_are_read(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = share_config(tmp_path, {"path": "a", "tag": "first"}, {"path": str(tmp_path / "b"), "tag": "t" * 36,
                                                                    "read_only": True})  # fmt: skip
    assert [(s.path, s.tag, s.read_only) for s in config.shares] == [(tmp_path / "a", "first", False),
                                                                      (tmp_path / "b", "t" * 36, True)]  # fmt: skip
    assert config.virtio_device_count == 2


@pytest.mark.parametrize("share, message", [
    ({"tag": "x"}, "vm.toml: share[0].path: missing"),
    ({"path": "d"}, "vm.toml: share[0].tag: missing"),
    ({"path": "nowhere", "tag": "x"}, "vm.toml: share[0].path: directory not found: "),
    ({"path": "file", "tag": "x"}, "vm.toml: share[0].path: not a directory: "),
    ({"path": "d", "tag": ""}, "vm.toml: share[0].tag: '' must be 1-36 bytes"),
    ({"path": "d", "tag": "t" * 37}, "vm.toml: share[0].tag: "),
    ({"path": "d", "tag": "é" * 19}, "must be 1-36 bytes"),  # 38 bytes of UTF-8
    ({"path": "d", "tag": "a\nb"}, "printable"),
    ({"path": "d", "tag": 5}, "vm.toml: share[0].tag: must be a string of 1-36 bytes, not an integer"),
    ({"path": "d", "tag": "x", "read_only": "yes"}, "vm.toml: share[0].read_only: must be true or false"),
    ({"path": "d", "tag": "x", "cache": "auto"}, "vm.toml: share[0].cache: unknown key"),
])  # fmt: skip
def test_bad_shares_are_one_line_errors(tmp_path, share, message):
    (tmp_path / "d").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as info:
        share_config(tmp_path, share)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_tags_are_unique_and_shares_count_against_the_device_limit(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match=r"share\[1\].tag: 'x' is already the tag of another share"):
        share_config(tmp_path, {"path": "d", "tag": "x"}, {"path": "d", "tag": "x"})
    with pytest.raises(ConfigError, match=r"^vm.toml: share: 9 virtio devices; at most 8"):
        share_config(tmp_path, *({"path": "d", "tag": f"t{i}"} for i in range(9)))


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd is Linux-only")
def test_shared_memory_regions_expose_their_file():
    memory = GuestMemory.shared([(0, 1 << 20), (4 << 20, 2 << 20)])
    try:
        assert memory.is_shared
        low, high = memory.regions
        assert low.fd == high.fd and (low.fd_offset, high.fd_offset) == (0, 1 << 20)
        assert os.fstat(low.fd).st_size == 3 << 20
        memory.write((4 << 20) + 8, b"through the file")
        other = mmap.mmap(high.fd, high.size, offset=high.fd_offset)  # what a backend does
        assert other[8:24] == b"through the file"
        other[0:4] = b"back"
        assert memory.read(4 << 20, 4) == b"back"
        other.close()
        fd = low.fd
    finally:
        memory.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the memory
    memory.close()  # twice is harmless
    assert not GuestMemory.anonymous([(0, 1 << 20)]).is_shared


def test_shared_memory_without_memfd_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(os, "memfd_create", raising=False)
    with pytest.raises(GuestMemoryError, match=r"^cannot create 1 MiB of shared guest RAM: .*needs Linux"):
        GuestMemory.shared([(0, 1 << 20)])


def test_snapshot_refuses_a_vm_with_a_vhost_user_device():
    from pyvmm.vmm.snapshot import SnapshotError, create

    device = SimpleNamespace(external_queues=True)
    machine = SimpleNamespace(paused=True, virtio=[SimpleNamespace(name="virtio-blk0", device=SimpleNamespace()),
                                                   SimpleNamespace(name="virtio-fs0", device=device)])  # fmt: skip
    with pytest.raises(SnapshotError) as info:
        create(machine, None, "s", "m")
    assert str(info.value).startswith("virtio-fs0 is a vhost-user device: its backend's state")
