"""The arcp-supervisor parent process: transports, sessions, jobs and authority."""

__version__ = "0.1.0"
