"""The shell client: `arcp-supervisor submit | jobs | watch | cancel | top`.

Built on the official Python ARCP client (`arcp`): `connection` opens the session,
`interrupts` runs each subcommand (Ctrl-C, exit status), `follow` is `submit` and `watch`,
`jobs` is `jobs` and `cancel`, `top` is `top`, and `render` draws what they show (rich on a
terminal, plain text without control characters elsewhere).
"""

from __future__ import annotations

# Exit statuses of every subcommand.
OK = 0
JOB_FAILED = 1
USAGE = 2
UNREACHABLE = 3
INTERRUPTED = 130
