"""The state store's database file (supervisor/state/sqlite.py): a directory only the
supervisor's user can enter, the file 0600, and the WAL and shared-memory files beside it 0600
too."""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("arcp.store")
DB_NAME = "arcp-supervisor.sqlite3"


def private_db(state_dir: str) -> str:
    """The database path in a directory only the supervisor's user can enter; the file 0600."""
    try:
        os.makedirs(state_dir, mode=0o700)
    except FileExistsError:
        if not os.path.isdir(state_dir):
            raise
        mode = os.stat(state_dir).st_mode & 0o777
        if mode & 0o077:
            log.warning("state dir %s is mode %03o: others can see what it holds (the database itself "
                        "is 0600)", state_dir, mode)
    else:
        os.chmod(state_dir, 0o700)  # makedirs' mode is masked by the umask
    path = os.path.join(state_dir, DB_NAME)
    # SQLite makes its WAL and shared-memory files with the database file's mode: create it 0600 first.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    tighten(path)
    return path


def tighten(path: str) -> None:
    """WAL and shared-memory files left by an older run with a wider mode: 0600 too."""
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            st = os.stat(path + suffix, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            os.chmod(path + suffix, 0o600)
