"""`python -m worker CTL_FD PARENT_PID`: the fork server the supervisor starts."""

import sys

from worker.forkserver import main

main(sys.argv[1:])
