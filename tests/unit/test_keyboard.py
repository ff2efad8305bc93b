"""The console's keyboard side: the Ctrl-A escape (sans-IO) and the Windows key reader (a fake msvcrt)."""

from pyvmm.cli import EscapeFilter
from pyvmm.host.console import Keyboard


def test_escape_filter_passes_keys_and_quits_on_ctrl_a_x():
    f = EscapeFilter()
    assert f.feed(b"ls\r") == b"ls\r"
    assert f.feed(b"\x01\x01") == b"\x01"  # Ctrl-A Ctrl-A sends one Ctrl-A
    assert f.feed(b"a\x01") == b"a" and f.escaped  # an escape split across reads
    assert f.feed(b"xyz") == b"" and f.quit
    assert f.feed(b"more") == b""


class FakeMsvcrt:
    """msvcrt.getwch as the Windows console delivers keys: arrows as a 0xE0 prefix plus a scan code."""

    def __init__(self, keys):
        self.keys = list(keys)

    def getwch(self):
        return self.keys.pop(0)


class FakeStdin:
    def __init__(self, tty=True):
        self.tty = tty

    def isatty(self):
        return self.tty

    def fileno(self):
        raise AssertionError("the Windows reader never uses the fd")


def test_windows_keys_become_what_a_serial_terminal_sends():
    keyboard = Keyboard(FakeStdin(), msvcrt_module=FakeMsvcrt(["a", "\r", "\xe0", "H", "\x00", "S", "é", "\x03"]))
    keyboard.enter()  # nothing to switch on Windows
    got = [keyboard.read() for _ in range(6)]
    assert got == [b"a", b"\r", b"\x1b[A", b"\x1b[3~", "é".encode(), b"\x03"]  # Ctrl-C goes to the guest
    keyboard.restore()


def test_ctrl_z_ends_redirected_input_on_windows():
    assert Keyboard(FakeStdin(tty=False), msvcrt_module=FakeMsvcrt(["\x1a"])).read() == b""
    assert Keyboard(FakeStdin(tty=True), msvcrt_module=FakeMsvcrt(["\x1a"])).read() == b"\x1a"
