"""An agent with a dependency of its own: it fetches a URL with httpx, which the supervisor
does not have. Its venv is built by build-venv.sh from requirements.txt; it is registered
with its interpreter and this directory:

    arcp-supervisor run --agent fetch=fetch_agent:fetch \\
        --agent-python fetch=examples/fetch_agent/.venv/bin/python \\
        --agent-path fetch=examples/fetch_agent

Its jobs reach the network only through the supervisor's egress proxy, and only what
their lease's `net.fetch` allows; httpx finds the proxy in HTTP_PROXY/HTTPS_PROXY.
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx

from worker import JobContext


def fetch(input: Any, job: JobContext) -> Any:
    url = input["url"]
    job.log("info", f"fetching {url}")
    with httpx.Client(timeout=float(input.get("timeout", 10)), follow_redirects=False) as client:
        r = client.get(url)
    if r.status_code == 403 and "lease" in r.text:
        job.log("warn", f"the proxy refused {url}: {r.text.strip()}")
    return {"status": r.status_code, "bytes": len(r.content), "sha256": hashlib.sha256(r.content).hexdigest(),
            "httpx": httpx.__version__}
