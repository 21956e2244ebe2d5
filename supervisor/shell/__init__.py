"""The shell client: `arcp-supervisor submit | jobs | watch | cancel | top`.

Built on the official Python ARCP client (`arcp`): `connection` opens the session,
`commands` runs each subcommand, `render` draws what it shows (rich on a terminal,
plain text without control characters elsewhere).
"""

from __future__ import annotations

# Exit statuses of every subcommand.
OK = 0
JOB_FAILED = 1
USAGE = 2
UNREACHABLE = 3
INTERRUPTED = 130
