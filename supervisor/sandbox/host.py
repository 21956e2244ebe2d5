"""The host-side choices made once at start: the uids jobs run as, and the scrubbed
environment the fork server (and so every worker) starts with."""

from __future__ import annotations

import logging
import os

from shared import capabilities
from supervisor.config import DEFAULT_JOB_UIDS, Config, ConfigError, check_uid_range

log = logging.getLogger("arcp.runtime")
ENV_PASSED = ("PATH", "LANG", "TZ")


def job_uid_range(config: Config) -> tuple[int, int] | None:
    """The uids jobs run as: the configured range, or the default one, when the supervisor is
    root with the capabilities that takes; None (jobs under the supervisor's uid) only for a
    supervisor without them that was told `--allow-shared-uid`. ConfigError otherwise, before
    anything starts."""
    lacking = capabilities.missing(capabilities.FOR_JOB_UIDS) if os.geteuid() == 0 else []
    if lacking:  # root in a container that dropped them, say: the fork server could not keep them
        if not config.allow_shared_uid:
            raise ConfigError(f"the supervisor runs as root without {', '.join(lacking)}, so jobs cannot be "
                              "given uids of their own and would run as root; grant "
                              f"{'them' if len(lacking) > 1 else 'it'}, or pass --allow-shared-uid ([sandbox] "
                              "allow_shared_uid) to accept that (`arcp-supervisor doctor` lists what is then "
                              "not enforced)")
        log.warning("job uids off: the supervisor lacks %s; jobs run under its uid (--allow-shared-uid)",
                    ", ".join(lacking))
        return None
    if os.geteuid() != 0:
        if not config.allow_shared_uid:
            raise ConfigError("the supervisor is not root, so jobs would run under its own uid and could "
                              "change its resource limits and its files outside their lease; run it as "
                              "root, or pass --allow-shared-uid ([sandbox] allow_shared_uid) to accept that "
                              "(`arcp-supervisor doctor` lists what is then not enforced)")
        if config.job_uids is not None:
            log.warning("[sandbox] job_uids needs a supervisor running as root: ignored")
        return None
    if config.job_uids is not None:
        return config.job_uids
    check_uid_range(DEFAULT_JOB_UIDS, "the default job uid range (set [sandbox] job_uids)")
    return DEFAULT_JOB_UIDS


def worker_env() -> dict[str, str]:
    """The scrubbed environment of the fork server and so of every worker."""
    env = {k: v for k, v in os.environ.items() if k in ENV_PASSED or k.startswith("LC_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env
