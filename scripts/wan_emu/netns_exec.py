"""Run a Python module inside a named network namespace: ``python -m scripts.wan_emu.netns_exec NS MODULE ARGS...``.

Like ``ip netns exec NS python -m MODULE ARGS`` but the process stays *this* Python process (so the caller's PID is
the node's PID, and :class:`node.local.Proc` stops it as usual). Must be entered before any thread starts.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import sys

CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into network namespace ``name`` (as created by ``ip netns add``)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python -m scripts.wan_emu.netns_exec NETNS MODULE [ARGS...]")
    ns, module, *rest = sys.argv[1:]
    enter_netns(ns)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
