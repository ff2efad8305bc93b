"""The legacy PC devices: sans-IO models that plug into ``vmm.bus`` port ranges."""

from pyvmm.devices.legacy.cmos import Cmos
from pyvmm.devices.legacy.debug_exit import DebugExit
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.post import PostCode
from pyvmm.devices.legacy.serial import Serial

__all__ = ["Cmos", "DebugExit", "I8042", "PostCode", "Serial"]
