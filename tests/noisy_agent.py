"""An agent module that writes to stdout and stderr when it is imported (in the fork server,
and in the worker that checks it at start): text the supervisor's log must carry as records."""

from __future__ import annotations

import sys
from typing import Any

from worker import JobContext

print("noisy agent: imported, on stdout")
print('noisy agent: on stderr {"level": "forged"}\nnoisy agent: a second line', file=sys.stderr, flush=True)
sys.stdout.flush()


def run(input: Any, job: JobContext) -> Any:
    print("noisy agent: inside a job (a log event of the job, not a record of the supervisor)")
    job.log("info", "noisy agent: job.log inside a job")
    return {"ok": True}
