"""Settings: the TOML config file and command-line flags, merged into a frozen Config.

Every problem raises ConfigError with a message naming the flag or key. `settings` holds
Config, its parts and checks; `file` reads the TOML file; `memory` finds the memory budget's
default; `uids` the jobs' uid range.
"""

from __future__ import annotations

from supervisor.config.environments import parse_environment_flags, with_environment_flags
from supervisor.config.file import load_file
from supervisor.config.memory import default_memory_budget, memory_available
from supervisor.config.settings import (
    DEFAULT_ENVIRONMENT, ENTRY_RE, LOG_CHOICES, SIZE_RE, AgentEnvironment, AgentSpec, Config, ConfigError, GiB, KiB, Limits, MiB, agent_spec, check,
    log_setting, parse_agent_flag, parse_size,
)
from supervisor.config.uids import DEFAULT_JOB_UIDS, check_uid_range, parse_uid_range

__all__ = (
    "DEFAULT_ENVIRONMENT", "AgentEnvironment", "parse_environment_flags", "with_environment_flags", "DEFAULT_JOB_UIDS", "ENTRY_RE", "LOG_CHOICES", "SIZE_RE", "AgentSpec", "Config", "ConfigError", "GiB", "KiB",
    "Limits", "MiB", "agent_spec", "check", "check_uid_range", "default_memory_budget", "load_file",
    "log_setting", "memory_available", "parse_agent_flag", "parse_size", "parse_uid_range",
)
