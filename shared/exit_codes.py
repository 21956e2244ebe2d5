"""Exit statuses of a worker process, and how to describe one in an error message."""

from __future__ import annotations

import os
import signal

OK = 0
BOOT_ERROR = 70  # the worker could not set itself up (sandbox, pipe)
PIPE_ERROR = 71  # the supervisor's pipe broke or carried garbage


def describe_wait_status(status: int) -> str:
    """'killed by signal 9 (SIGKILL)' / 'exited with status 3' for a waitpid() status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by signal {sig} ({name})"
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        meaning = {BOOT_ERROR: " (worker set-up failed)", PIPE_ERROR: " (pipe to supervisor broke)"}
        return f"exited with status {code}{meaning.get(code, '')}"
    return f"ended with wait status {status}"
