"""Running jobs: the runner, the worker processes and their pipe."""
