"""Agents of the egress tests that their own servers serve (agent modules import only the
standard library and the worker runtime: jobs cannot import the test tools)."""

from __future__ import annotations

from typing import Any


def hold_connections(input: Any, job: Any) -> Any:
    """An agent (served by the low-descriptor server of test_egress.py): open `n` tunnels through the job's
    proxy to 127.0.0.1:`port`, keep those that open until the far end closes one (at most
    `hold` seconds), and say how each attempt went."""
    import os
    import socket as so

    proxy = int(os.environ["HTTP_PROXY"].rsplit(":", 1)[1])
    target = f"127.0.0.1:{input['port']}"
    statuses: list[int] = []
    refusals: list[str] = []
    held: list[so.socket] = []
    for _ in range(int(input["n"])):
        s = so.create_connection(("127.0.0.1", proxy), timeout=20)
        answer = b""
        try:
            s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            while b"\r\n\r\n" not in answer and (b := s.recv(4096)):
                answer += b
        except OSError as e:
            answer += f"[{type(e).__name__}]".encode()
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        statuses.append(status)
        if status == 200:
            held.append(s)
            continue
        try:
            while b := s.recv(4096):
                answer += b
        except OSError:
            pass
        refusals.append(answer.decode("latin-1"))
        s.close()
    job.log("info", f"holding {len(held)}")
    if held:
        held[0].settimeout(float(input.get("hold", 60)))
        try:
            held[0].recv(1)
        except OSError:
            pass
    for s in held:
        s.close()
    return {"statuses": statuses, "refusals": refusals}
