"""Config validation: every error path gives one line naming file, key and problem."""

import os

import pytest

from pyvmm.config import DEFAULT_CMDLINE, MIN_MEMORY_MIB, config_from_dict, load_config, parse_accel
from pyvmm.errors import ConfigError


def write(tmp_path, text, name="vm.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_defaults(tmp_path, kernel_file):
    cfg = load_config(write(tmp_path, '[boot]\nkernel = "vmlinux"\n'))
    assert cfg.machine.vcpus == 1
    assert cfg.machine.memory_mib == 128
    assert cfg.machine.accel == ["kvm", "hvf", "whpx", "interp"]
    assert cfg.machine.fallback is True
    assert cfg.boot.kernel == kernel_file.resolve()
    assert cfg.boot.initrd is None
    assert cfg.boot.cmdline == DEFAULT_CMDLINE


def test_paths_are_relative_to_the_config_file(tmp_path):
    sub = tmp_path / "vm"
    sub.mkdir()
    (sub / "k.elf").write_bytes(b"\x7fELF" + bytes(60))
    (sub / "rd.gz").write_bytes(b"x")
    cfg = load_config(write(sub, '[boot]\nkernel = "k.elf"\ninitrd = "rd.gz"\n'))
    assert cfg.boot.kernel == (sub / "k.elf").resolve()
    assert cfg.boot.initrd == (sub / "rd.gz").resolve()


def test_full_config(tmp_path, kernel_file):
    cfg = load_config(
        write(
            tmp_path,
            '[machine]\nvcpus = 2\nmemory_mib = 256\naccel = ["interp", "kvm"]\nfallback = false\n'
            '[boot]\nkernel = "vmlinux"\ncmdline = "console=ttyS0 quiet"\n',
        )
    )
    assert (cfg.machine.vcpus, cfg.machine.memory_mib, cfg.machine.accel, cfg.machine.fallback) == (
        2,
        256,
        ["interp", "kvm"],
        False,
    )
    assert cfg.boot.cmdline == "console=ttyS0 quiet"


def test_bzimage_passes_the_format_sniff(tmp_path):
    image = bytearray(0x400)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    (tmp_path / "bz").write_bytes(bytes(image))
    assert load_config(write(tmp_path, '[boot]\nkernel = "bz"\n')).boot.kernel.name == "bz"


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ('[boot]\nkernel = "vmlinux"\n[machin]\n', "machin", "unknown section"),
        ('[machine]\ncpus = 2\n[boot]\nkernel = "vmlinux"\n', "machine.cpus", "unknown key"),
        ('[machine]\nvcpus = "2"\n[boot]\nkernel = "vmlinux"\n', "machine.vcpus", "must be an integer, not a string"),
        ('[machine]\nvcpus = true\n[boot]\nkernel = "vmlinux"\n', "machine.vcpus", "must be an integer, not a boolean"),
        ('[machine]\nvcpus = 0\n[boot]\nkernel = "vmlinux"\n', "machine.vcpus", "at least 1"),
        ('[machine]\nvcpus = 300\n[boot]\nkernel = "vmlinux"\n', "machine.vcpus", "254"),
        ('[machine]\nvcpus = 255\n[boot]\nkernel = "vmlinux"\n', "machine.vcpus", "255 is more than the 254"),
        ('[machine]\nmemory_mib = 1.5\n[boot]\nkernel = "vmlinux"\n', "machine.memory_mib", "not a float"),
        ('[machine]\nmemory_mib = 4\n[boot]\nkernel = "vmlinux"\n', "machine.memory_mib", f"minimum of {MIN_MEMORY_MIB} MiB"),
        ('[machine]\nmemory_mib = 100000000\n[boot]\nkernel = "vmlinux"\n', "machine.memory_mib", "more than this host"),
        ('[machine]\naccel = "vmware"\n[boot]\nkernel = "vmlinux"\n', "machine.accel", "unknown accelerator 'vmware'"),
        ('[machine]\naccel = []\n[boot]\nkernel = "vmlinux"\n', "machine.accel", "non-empty list"),
        ('[machine]\naccel = [1]\n[boot]\nkernel = "vmlinux"\n', "machine.accel", "non-empty list"),
        ('[machine]\nfallback = "no"\n[boot]\nkernel = "vmlinux"\n', "machine.fallback", "true or false"),
        ("[machine]\n", "boot.kernel", "missing"),
        ('[boot]\nkernel = "nope"\n', "boot.kernel", "file not found"),
        ('[boot]\nkernel = ""\n', "boot.kernel", "is empty"),
        ('[boot]\nkernel = "."\n', "boot.kernel", "not a regular file"),
        ('[boot]\nkernel = 5\n', "boot.kernel", "must be a path string"),
        ('[boot]\nkernel = "vmlinux"\ninitrd = "missing.gz"\n', "boot.initrd", "file not found"),
        ('[boot]\nkernel = "vmlinux"\ncmdline = "a\\u00e9"\n', "boot.cmdline", "non-ASCII"),
        ('[boot]\nkernel = "vmlinux"\ncmdline = "a\\nb"\n', "boot.cmdline", "non-printable"),
        ('boot = 3\n', "boot", "must be a table"),
    ],
)
def test_each_error_names_file_key_and_problem(tmp_path, kernel_file, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.key == key
    assert problem in err.problem
    message = str(err)
    assert message.startswith(f"{path}: {key}: ")
    assert "\n" not in message


def test_kernel_of_unknown_format(tmp_path):
    (tmp_path / "junk").write_bytes(b"MZ" + bytes(1000))
    with pytest.raises(ConfigError, match="neither an ELF vmlinux, a bzImage nor a multiboot image") as info:
        load_config(write(tmp_path, '[boot]\nkernel = "junk"\n'))
    assert info.value.key == "boot.kernel"


@pytest.mark.skipif(getattr(os, "geteuid", lambda: 1)() == 0, reason="root can read files without read permission")
@pytest.mark.skipif(os.name == "nt", reason="chmod cannot take read permission away on Windows")
def test_unreadable_kernel(tmp_path, kernel_file):
    kernel_file.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        load_config(write(tmp_path, '[boot]\nkernel = "vmlinux"\n'))


def test_unreadable_kernel_as_root_too(tmp_path, kernel_file, monkeypatch):
    # root bypasses file modes, so check the access() path directly
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="permission denied"):
        load_config(write(tmp_path, '[boot]\nkernel = "vmlinux"\n'))


def test_toml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 2") as info:
        load_config(write(tmp_path, "[boot]\nkernel = \n"))
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_config_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_binary_config_file(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError):
        load_config(path)


def test_dict_config_uses_base_dir(tmp_path, kernel_file):
    cfg = config_from_dict({"boot": {"kernel": "vmlinux"}}, base_dir=tmp_path)
    assert cfg.boot.kernel == kernel_file.resolve()
    assert cfg.source == "<dict>"


def test_parse_accel_expands_auto_and_dedups():
    assert parse_accel("auto") == ["kvm", "hvf", "whpx", "interp"]
    assert parse_accel(["interp", "auto"]) == ["interp", "kvm", "hvf", "whpx"]
    assert parse_accel("kvm") == ["kvm"]


def test_virtio_sections(tmp_path, kernel_file):
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    (tmp_path / "ro.img").write_bytes(bytes(4096))
    cfg = load_config(
        write(
            tmp_path,
            '[boot]\nkernel = "vmlinux"\n'
            '[[drive]]\npath = "disk.img"\nserial = "disk0"\n'
            '[[drive]]\npath = "ro.img"\nread_only = true\n'
            '[[net]]\ntap = "tap0"\nmac = "52:54:00:12:34:56"\n'
            "[rng]\nenabled = true\n",
        )
    )
    assert [(d.path.name, d.read_only, d.serial) for d in cfg.drives] == [("disk.img", False, "disk0"), ("ro.img", True, None)]
    assert [(n.tap, n.mac) for n in cfg.nets] == [("tap0", "52:54:00:12:34:56")]
    assert cfg.rng is True
    assert cfg.virtio_device_count == 4


def test_rng_section_alone_enables_it(tmp_path, kernel_file):
    assert load_config(write(tmp_path, '[boot]\nkernel = "vmlinux"\n[rng]\n')).rng is True
    assert load_config(write(tmp_path, '[boot]\nkernel = "vmlinux"\n[rng]\nenabled = false\n')).rng is False
    assert load_config(write(tmp_path, '[boot]\nkernel = "vmlinux"\n')).rng is False


@pytest.mark.parametrize(
    "extra, key, problem",
    [
        ("[drive]\npath = 'disk.img'\n", "drive", "array of tables"),
        ("[[drive]]\nread_only = true\n", "drive[0].path", "missing"),
        ("[[drive]]\npath = 'nope.img'\n", "drive[0].path", "file not found"),
        ("[[drive]]\npath = 'disk.img'\ncache = 'none'\n", "drive[0].cache", "unknown key"),
        ("[[drive]]\npath = 'disk.img'\nread_only = 1\n", "drive[0].read_only", "true or false"),
        ("[[drive]]\npath = 'disk.img'\nserial = '123456789012345678901'\n", "drive[0].serial", "at most 20"),
        ("[[drive]]\npath = 'disk.img'\n[[drive]]\npath = 'disk.img'\n", "drive[1].path", "already used"),
        ("[[net]]\nmac = '52:54:00:12:34:56'\n", "net[0].tap", "missing"),
        ("[[net]]\ntap = 'a-very-long-tap-name'\n", "net[0].tap", "not a valid interface name"),
        ("[[net]]\ntap = 'tap0'\nmac = '52:54:00:12:34'\n", "net[0].mac", "not a MAC address"),
        ("[[net]]\ntap = 'tap0'\nmac = '01:00:5e:00:00:01'\n", "net[0].mac", "multicast"),
        ("[[net]]\ntap = 'tap0'\n[[net]]\ntap = 'tap0'\n", "net[1].tap", "already used"),
        ("[rng]\nenabled = 'yes'\n", "rng.enabled", "true or false"),
        ("[rng]\nsource = '/dev/random'\n", "rng.source", "unknown key"),
    ],
)
def test_virtio_errors(tmp_path, kernel_file, extra, key, problem):
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    path = write(tmp_path, '[boot]\nkernel = "vmlinux"\n' + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert problem in info.value.problem
    assert "\n" not in str(info.value)


def test_too_many_virtio_devices(tmp_path, kernel_file):
    drives = ""
    for i in range(9):
        (tmp_path / f"d{i}.img").write_bytes(bytes(512))
        drives += f"[[drive]]\npath = 'd{i}.img'\n"
    with pytest.raises(ConfigError, match="at most 8"):
        load_config(write(tmp_path, '[boot]\nkernel = "vmlinux"\n' + drives))


def test_unwritable_image_needs_read_only(tmp_path, kernel_file, monkeypatch):
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    with pytest.raises(ConfigError, match="not writable.*read_only = true"):
        load_config(write(tmp_path, '[boot]\nkernel = "vmlinux"\n[[drive]]\npath = "disk.img"\n'))
    cfg = load_config(write(tmp_path, '[boot]\nkernel = "vmlinux"\n[[drive]]\npath = "disk.img"\nread_only = true\n'))
    assert cfg.drives[0].read_only


@pytest.mark.parametrize("key", ["kernel", "initrd"])
def test_a_nul_byte_in_a_path_is_a_config_error(tmp_path, kernel_file, key):
    boot = {"kernel": "vmlinux", key: "a\u0000b"}
    with pytest.raises(ConfigError, match=rf"<dict>: boot.{key}: 'a\\x00b' contains a NUL character"):
        config_from_dict({"boot": boot}, base_dir=tmp_path)


def test_a_nul_byte_in_a_config_file_path_through_the_cli(tmp_path, kernel_file, capsys):
    from pyvmm.cli import main

    config = write(tmp_path, '[boot]\nkernel = "a\\u0000b"\n')
    assert main(["boot", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "boot.kernel" in err and "NUL" in err and "Traceback" not in err


def test_an_overlong_path_is_a_config_error(tmp_path, kernel_file):
    with pytest.raises(ConfigError, match="boot.kernel: cannot use .* as a file path"):
        config_from_dict({"boot": {"kernel": "x" * 5000}}, base_dir=tmp_path)


# --- fuzzing: whatever the structure, config_from_dict answers with a config or a ConfigError

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_KEYS = ["machine", "boot", "drive", "net", "rng", "vcpus", "memory_mib", "accel", "fallback", "kernel", "initrd",
         "cmdline", "path", "read_only", "serial", "lock", "tap", "mac", "enabled", "other"]  # fmt: skip
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True)
            | st.text(max_size=40) | st.sampled_from(["vmlinux", "a\x00b", "", "~", "/dev/null", "auto", "kvm",
                                                     "52:54:00:12:34:56", "x" * 300]))  # fmt: skip
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), inner, max_size=5),
                       max_leaves=20)  # fmt: skip
_configs = st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6) | _values


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_configs)
def test_config_from_dict_raises_only_config_errors(tmp_path, kernel_file, data):
    try:
        config_from_dict(data, base_dir=tmp_path)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("<dict>")


_sections = st.fixed_dictionaries(
    {"boot": st.fixed_dictionaries({"kernel": st.just("vmlinux") | _scalars},
                                   optional={"initrd": _scalars, "cmdline": _scalars})},
    optional={
        "machine": st.dictionaries(st.sampled_from(["vcpus", "memory_mib", "accel", "fallback"]), _values, max_size=4),
        "drive": st.lists(st.dictionaries(st.sampled_from(["path", "read_only", "serial", "lock"]), _values,
                                          max_size=4), max_size=3),
        "net": st.lists(st.dictionaries(st.sampled_from(["tap", "mac"]), _values, max_size=2), max_size=2),
        "rng": st.dictionaries(st.sampled_from(["enabled"]), _values, max_size=1),
    },
)  # fmt: skip


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_sections)
def test_well_shaped_configs_with_bad_values_raise_only_config_errors(tmp_path, kernel_file, data):
    try:
        config_from_dict(data, base_dir=tmp_path)
    except ConfigError as err:
        assert "\n" not in str(err)


def test_a_newline_in_a_path_stays_on_the_one_line_of_the_error(tmp_path, kernel_file):
    """Found by the fuzz test above: 'kernel = "\\n"' gave a two-line message."""
    with pytest.raises(ConfigError) as err:
        config_from_dict({"boot": {"kernel": "\n"}}, base_dir=tmp_path)
    assert "\n" not in str(err.value) and "file not found" in str(err.value)


def test_the_cli_keeps_any_error_on_one_line():
    from pyvmm.errors import one_line

    assert one_line("a\nb\r") == "a\\nb\\r"
