"""Durable state: the store of jobs, frames and credentials."""
