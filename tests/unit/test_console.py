"""The embedding API's console: output capture, waiting for text, typing into the UART."""

import re
import threading

import pytest

from pyvmm.api import Console
from pyvmm.errors import PyvmmError


def test_output_is_captured_and_echoed():
    import io

    echo = io.BytesIO()
    console = Console(echo)
    console._output(b"hello ")
    console._output(b"world\n")
    assert console.output == b"hello world\n"
    assert console.text == "hello world\n"
    assert echo.getvalue() == b"hello world\n"


def test_wait_for_returns_when_text_arrives_from_another_thread():
    console = Console()
    timer = threading.Timer(0.05, console._output, args=(b"booting...\nlogin: ",))
    timer.start()
    match = console.wait_for("login:", timeout=5)
    assert match.group(0) == b"login:"


def test_wait_for_line_waits_for_the_whole_line():
    console = Console()
    console._output(b"[ 0.0] Linux version 6.1")
    threading.Timer(0.05, console._output, args=(b".0 (gcc)\r\nnext\n",)).start()
    assert console.wait_for_line("Linux version", timeout=5) == "[ 0.0] Linux version 6.1.0 (gcc)"


def test_wait_for_regex_and_start_offset():
    console = Console()
    console._output(b"ok 1\nok 2\n")
    assert console.wait_for(re.compile(r"ok (\d)"), timeout=1).group(1) == b"1"
    assert console.wait_for(re.compile(rb"ok (\d)"), timeout=1, start=3).group(1) == b"2"


def test_timeout_names_the_pattern_and_shows_the_tail():
    console = Console()
    console._output(b"kernel panic")
    with pytest.raises(TimeoutError, match=r"'login:'.*kernel panic"):
        console.wait_for("login:", timeout=0.1)


def test_write_before_build_is_a_clear_error():
    with pytest.raises(PyvmmError, match="no console yet"):
        Console().write("x")


def test_write_goes_to_the_uart():
    class Uart:
        def __init__(self):
            self.data = b""

        def enqueue_input(self, data):
            self.data += data

    console = Console()
    console._serial = Uart()
    console.write("root\n")
    console.write(b"\x03")
    assert console._serial.data == b"root\n\x03"


def test_buffer_is_bounded(monkeypatch):
    import pyvmm.api as api

    monkeypatch.setattr(api, "_CONSOLE_KEEP", 16)
    console = Console()
    console._output(b"0123456789")
    console._output(b"abcdefghij")
    assert console.output == b"456789abcdefghij"
    # offsets given by the caller still refer to the whole stream
    assert console.wait_for("ij", timeout=0.1, start=15).start() >= 0
