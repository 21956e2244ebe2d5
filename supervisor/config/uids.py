"""Jobs' uids and gids: the default range, and the check that no one else's ids fall in it."""

from __future__ import annotations

import re
from typing import Any

from supervisor.config.settings import ConfigError

# Jobs' uids (and gids) when the supervisor is root and the config names none: far above
# the ranges distributions give users (1000-60000) and user namespaces (/etc/subuid,
# usually 100000 + 65536 per user), below 2^31 for tools that keep a uid in a signed int.
DEFAULT_JOB_UIDS = (1_900_000_000, 1_900_065_535)


def parse_uid_range(text: Any, what: str) -> tuple[int, int]:
    if not isinstance(text, str) or not re.match(r"^\d+-\d+$", text):
        raise ConfigError(f"{what}: expected FIRST-LAST, got {text!r}")
    a, b = (int(x) for x in text.split("-"))
    if not 0 < a <= b or b >= 2 ** 31:
        raise ConfigError(f"{what}: range {text!r} must be ascending, above 0 and below 2^31")
    check_uid_range((a, b), what)
    return a, b


def check_uid_range(r: tuple[int, int], what: str) -> None:
    """A job must never share a uid or gid with anyone else: no user, group, or subordinate
    id range of /etc/passwd, /etc/group, /etc/subuid or /etc/subgid may fall in `r`."""
    import grp
    import pwd

    a, b = r
    text = f"{a}-{b}"
    for user in pwd.getpwall():
        if a <= user.pw_uid <= b:
            raise ConfigError(f"{what}: uid {user.pw_uid} of range {text!r} belongs to user {user.pw_name!r}")
    for group in grp.getgrall():
        if a <= group.gr_gid <= b:
            raise ConfigError(f"{what}: gid {group.gr_gid} of range {text!r} belongs to group {group.gr_name!r}")
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                lo, n = int(parts[1]), int(parts[2])
                if lo <= b and a < lo + n:
                    raise ConfigError(f"{what}: range {text!r} overlaps {parts[0]!r}'s subordinate ids "
                                      f"{lo}-{lo + n - 1} in {path}")
