"""The error hierarchy: one type per layer, each chained with ``raise ... from``.

The CLI prints any ``PyvmmError`` as one line (``str(err)``) with no traceback;
anything else escaping is a bug in pyvmm and is reported as such.
"""


def one_line(message: str) -> str:
    """Errors are one line: a newline that came from outside (a key, a file name, a guest string) is escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


class PyvmmError(Exception):
    """Base of every error pyvmm raises on purpose."""

    #: process exit status the CLI uses for this kind of error
    exit_status = 1


class ConfigError(PyvmmError):
    """A bad configuration: names the file, the key and the problem."""

    exit_status = 2

    def __init__(self, problem: str, *, file: str | None = None, key: str | None = None):
        self.problem, self.file, self.key = problem, file, key
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(one_line(f"{where}: {problem}" if where else problem))


class AccelError(PyvmmError):
    """An accelerator (hypervisor or interpreter) is unusable or failed."""

    def __init__(self, backend: str, cause: str):
        self.backend, self.cause = backend, cause
        super().__init__(f"{backend}: {cause}")


class GuestMemoryError(PyvmmError):
    """A guest-physical access outside guest RAM: names the address and length."""


class BootError(PyvmmError):
    """A kernel or initrd that cannot be loaded: names the file and the problem."""

    exit_status = 2


class GuestError(PyvmmError):
    """The guest did something fatal (triple fault, emulation failure, ...)."""

    def __init__(self, what: str, *, rip: int | None = None, vcpu: int | None = None):
        self.what, self.rip, self.vcpu = what, rip, vcpu
        where = []
        if vcpu is not None:
            where.append(f"vcpu {vcpu}")
        if rip is not None:
            where.append(f"rip {rip:#x}")
        super().__init__(f"guest error ({', '.join(where)}): {what}" if where else f"guest error: {what}")


class DeviceError(PyvmmError):
    """A device could not be set up (host file, tap, ...)."""
