"""Code shared by the supervisor and its workers: wire shapes, errors, ids, the pipe codec."""
