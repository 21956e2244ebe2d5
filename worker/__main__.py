"""The fork server the supervisor starts, on an agent environment's interpreter:

    python -I [-S] RUNTIME/worker/__main__.py CTL_FD PARENT_PID OPTIONS_JSON

RUNTIME is the worker runtime's read-only copy (supervisor/sandbox/worker_runtime.py); run
as a file, this puts it first on the import path (`-I` ignores PYTHON* variables and the
current directory; `-S` leaves the supervisor's own interpreter without site-packages).
`python -m worker ...` works too, with the runtime the interpreter already sees."""

import os
import signal
import sys

# The supervisor decides when the fork server stops (it dies with the supervisor, by the
# parent-death signal, or when its control socket closes): a SIGTERM, SIGINT or SIGHUP sent
# to the supervisor's whole process group (systemd, `timeout`, a terminal) must not end it
# while the supervisor drains. Ignored before the imports below, which take a while.
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_IGN)

if sys.version_info < (3, 11):  # an agent environment's interpreter: say plainly what is wrong
    sys.stderr.write("arcp fork server: Python %d.%d is too old: the worker runtime needs 3.11 or newer\n"
                     % sys.version_info[:2])
    sys.exit(3)

if not __package__:  # run as a file: the runtime directory that holds it goes first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worker.forkserver import main  # noqa: E402

main(sys.argv[1:])
