"""A gdb remote serial protocol stub, independent of the backend.

``packets`` frames the byte stream (sans-IO), ``target`` describes the x86-64 register file to gdb
and converts it to and from pyvmm's register dataclasses, ``stub`` is the protocol session over an
abstract ``DebugTarget``, ``server`` serves one gdb connection at a time on a TCP or Unix socket, and
``debugregs`` lays gdb's hardware breakpoints and watchpoints out in x86 debug registers for the
backends that arm them there.
"""
