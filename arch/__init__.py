"""Architecture facts both ``accel/`` and ``vmm/`` use: constants and pure codecs, no state.

A leaf: it imports nothing of pyvmm, so every layer may depend on it.
"""
