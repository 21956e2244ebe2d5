"""The egress proxy of jobs with a net.fetch lease."""
