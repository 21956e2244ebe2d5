"""Registered agents: resolution of `name[@version]` and the welcome inventory."""

from __future__ import annotations

from typing import Any

from shared.errors import AgentNotAvailable, AgentVersionNotAvailable, InvalidRequest
from shared.messages import split_agent_ref
from supervisor.config import AgentSpec


class AgentRegistry:
    def __init__(self, agents: tuple[AgentSpec, ...], defaults: tuple[str, ...] = ()) -> None:
        self._by_name: dict[str, dict[str, AgentSpec]] = {}
        self._default: dict[str, str] = {}
        for a in agents:
            self._by_name.setdefault(a.name, {})[a.version] = a
            self._default.setdefault(a.name, a.version)  # first registered ...
        for a in agents:
            if a.default:  # ... unless the config marks another
                self._default[a.name] = a.version
        for d in defaults:
            name, _, version = d.partition("@")
            self._default[name] = version

    def resolve(self, ref: Any) -> AgentSpec:
        """The agent a submit names; InvalidRequest / AgentNotAvailable / AgentVersionNotAvailable."""
        if not isinstance(ref, str):
            raise InvalidRequest(f"job.submit field 'agent' must be a string (got {type(ref).__name__})")
        try:
            name, version = split_agent_ref(ref)
        except ValueError as e:
            raise InvalidRequest(f"job.submit field 'agent': {e}") from e
        versions = self._by_name.get(name)
        if versions is None:
            raise AgentNotAvailable(f"agent {name!r} is not registered")
        if version is None:
            return versions[self._default[name]]
        spec = versions.get(version)
        if spec is None:
            raise AgentVersionNotAvailable(
                f"agent {name!r} has no version {version!r} (registered: {', '.join(sorted(versions))})"
            )
        return spec

    def inventory(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "versions": sorted(versions), "default": self._default[name]}
            for name, versions in sorted(self._by_name.items())
        ]
