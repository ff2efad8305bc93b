"""An object's registers as plain data (JSON-able) and back: the device and irqchip side of snapshots.

A model keeps its state in plain attributes (ints, bools, strings, lists and deques
of them, bytes, nested models); ``capture`` copies exactly those, ``apply`` writes
them back into a fresh object of the same class, and everything else (locks,
callbacks, IRQ lines, references to buses or other models) is wiring, rebuilt by
the builder and never saved. Attributes in ``times`` hold ``clock()`` values,
meaningless in another process: they travel as ages (seconds before the capture)
and are rebased on apply, so a timer due 3 ms after a snapshot is due 3 ms after
its restore. A saved field this version's object lacks is a ``ValueError`` naming
it: state from another version is refused, never half-applied into the wrong place.
"""

from __future__ import annotations

import collections

_SCALARS = (int, float, bool, str, type(None))


def _is_model(value) -> bool:
    return hasattr(value, "__dict__") and not callable(value) and type(value).__module__.startswith("pyvmm.")


def capture(obj, *, now: float = 0.0, times=frozenset(), skip=frozenset(), _seen=None) -> dict:
    seen = {id(obj)} if _seen is None else _seen | {id(obj)}
    out = {}
    for name, value in vars(obj).items():
        if name in skip:
            continue
        if name in times:
            out[name] = None if value is None else now - value
        elif isinstance(value, _SCALARS):
            out[name] = value
        elif isinstance(value, (bytes, bytearray)):
            out[name] = {"hex": bytes(value).hex()}
        elif isinstance(value, (list, tuple, collections.deque)):
            if all(isinstance(v, _SCALARS) for v in value):
                out[name] = list(value)
            elif all(_is_model(v) and id(v) not in seen for v in value):
                out[name] = [capture(v, now=now, times=times, _seen=seen) for v in value]
        elif _is_model(value) and type(value).__module__ == type(obj).__module__ and id(value) not in seen:
            # a part of this model (a PIT channel, an 8259 of the pair); a reference back up is wiring
            out[name] = {"model": capture(value, now=now, times=times, _seen=seen)}
    return out


def apply(obj, state: dict, *, now: float = 0.0, times=frozenset(), where: str = "") -> None:
    current = vars(obj)
    for name, value in state.items():
        path = f"{where}.{name}" if where else name
        if name not in current:
            raise ValueError(f"{path}: no such field in this version")
        old = current[name]
        if name in times:
            setattr(obj, name, None if value is None else now - value)
        elif isinstance(value, dict) and "hex" in value:
            setattr(obj, name, type(old)(bytes.fromhex(value["hex"])) if isinstance(old, (bytes, bytearray)) else bytes.fromhex(value["hex"]))
        elif isinstance(value, dict) and "model" in value:
            apply(old, value["model"], now=now, times=times, where=path)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            if len(old) != len(value):
                raise ValueError(f"{path}: {len(value)} entries saved, this object has {len(old)}")
            for i, child in enumerate(old):
                apply(child, value[i], now=now, times=times, where=f"{path}[{i}]")
        elif isinstance(value, list):
            if isinstance(old, collections.deque):
                setattr(obj, name, collections.deque(value, maxlen=old.maxlen))
            elif isinstance(old, tuple):
                setattr(obj, name, tuple(value))
            else:
                setattr(obj, name, list(value))
        else:
            setattr(obj, name, value)
