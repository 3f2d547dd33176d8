"""What a node program's exit status means, and the errors that lead to each one.

Every program (`gepo-learner`, `gepo-sampler`, `gepo-monitor`) prints one `error: ...` line naming the flag and
the fix, and exits with the status of the error's class:

    0    done
    1    anything else (a bug, or a failure at run time: the message or traceback says which)
    2    usage: a flag, recipe, path, address or key is wrong; nothing was started, fix the command line
    3    unreachable: no --peers address answered, or no learner (or, for the learner, no sampler) showed up in time
    4    trust: a learner was found, but not the one this sampler trusts (another key)
    130  interrupted (Ctrl-C / SIGTERM)

This module imports nothing heavy: the programs check their arguments before loading torch or hivemind.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TRUST = 4
EXIT_INTERRUPTED = 130


class ConfigError(ValueError):
    """A command-line value is unusable (malformed multiaddr, bad key, missing file...). The message is one line
    that names the flag and the fix. Exit status 2."""


class BootstrapError(RuntimeError):
    """None of the bootstrap peers could be reached. Exit status 3."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what and where."""


class TrustError(RuntimeError):
    """The swarm answered, but with a learner this node does not trust. Exit status 4."""


def fail(exc: BaseException, status: int | None = None) -> int:
    """Print `exc` as the one `error:` line and return the exit status of its class (or `status`)."""
    if status is None:
        status = next((code for cls, code in _STATUS if isinstance(exc, cls)), EXIT_FAILURE)
    print(f"error: {exc}", file=sys.stderr)
    return status


_STATUS = ((ConfigError, EXIT_USAGE), (TrustError, EXIT_TRUST), (BootstrapError, EXIT_UNREACHABLE),
           (TimeoutError, EXIT_UNREACHABLE))
