"""The worker side of arcp-supervisor: the agent's process, and its JobContext."""

from worker.context import JobContext, ResultWriter

__all__ = ["JobContext", "ResultWriter"]
