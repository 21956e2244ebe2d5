"""The protocol's pure parts: sessions, jobs, admission, authority, frames; no I/O."""
