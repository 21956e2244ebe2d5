"""The host side of the sandbox: cgroups, job dirs, job uids, path checks."""
