"""Kept for older imports: the process helpers live in node/local.py."""

from node.local import LOOPBACK, REPO, Proc, join_args  # noqa: F401
