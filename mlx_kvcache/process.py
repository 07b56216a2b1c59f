"""Leaving the process from a command-line entry point."""

import os
import sys


def exit_now(code: int) -> None:
    """Flush and exit without native libraries' shutdown hooks.

    With OpenBLAS preloaded (the Linux CPU setup), its thread pool's destructor
    sometimes waits forever on a worker thread at interpreter exit (seen here:
    the main thread in pthread_join from OpenBLAS's shutdown after all output
    was written). Every file a command writes is complete before this is
    called, so skipping those hooks loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
