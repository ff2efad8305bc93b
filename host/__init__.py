"""The host operating system's services pyvmm needs, one interface over Linux, macOS and Windows.

Each module picks its implementation once, at import, from what the platform
offers (psutil's way): a wake-up notifier (eventfd or a pipe/socket pair),
positional vectored file I/O with image locks, the terminal in raw mode, and
anonymous guest RAM. Nothing here imports the rest of pyvmm but its errors.
"""
