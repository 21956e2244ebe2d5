"""Frames on the supervisor<->worker pipe (msgpack lists; first item is the tag).

Supervisor -> worker:
    ["job", spec]                      run one job (spec: built by supervisor.runtime.Runtime.job_spec)
    ["reply", call_id, ok, value]      answer to a "call"; value is the error dict when not ok
    ["cancel", reason]                 stop the current job
Worker -> supervisor:
    ["ev", job_id, op, args]           fire-and-forget event (ops: EVENT_OPS)
    ["call", job_id, call_id, op, args]  needs a "reply" (ops: CALL_OPS)
    ["done", job_id, value, left]      the agent returned `value`
    ["fail", job_id, error, left]      the agent raised; error = {code, message, retryable, details?}
  `left` (optional): what the job left in the worker that a next job must not meet, as short
  strings (LEFT_KINDS: a thread, a child process, a changed sys.modules); empty when nothing.
"""

from __future__ import annotations

JOB, REPLY, CANCEL = "job", "reply", "cancel"
EV, CALL, DONE, FAIL = "ev", "call", "done", "fail"

EVENT_OPS = frozenset({
    "log", "thought", "status", "metric", "progress", "tool_result", "tool_error",
    "artifact_ref", "stream_open", "chunk", "stream_close",
})
CALL_OPS = frozenset({
    "tool_call", "budget", "reserve_budget", "validate_lease_op", "delegate", "rotate_credential",
})

LEFT_THREAD, LEFT_CHILD, LEFT_MODULES = "thread", "child process", "sys.modules changed"
LEFT_KINDS = frozenset({LEFT_THREAD, LEFT_CHILD, LEFT_MODULES})
IDLE_THREADS = 2  # an idle worker's threads: its main thread and its pipe thread (worker.rpc_client)

# Largest frame either side accepts on the pipe. An event body must also fit
# one outbound transport frame, which the supervisor checks separately.
MAX_PIPE_FRAME = 4 * 1024 * 1024
