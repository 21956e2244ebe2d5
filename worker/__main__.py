"""`python -m worker CTL_FD PARENT_PID`: the fork server the supervisor starts."""

import signal
import sys

# The supervisor decides when the fork server stops (it dies with the supervisor, by the
# parent-death signal, or when its control socket closes): a SIGTERM, SIGINT or SIGHUP sent
# to the supervisor's whole process group (systemd, `timeout`, a terminal) must not end it
# while the supervisor drains. Ignored before the imports below, which take a while.
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_IGN)

from worker.forkserver import main  # noqa: E402

main(sys.argv[1:])
