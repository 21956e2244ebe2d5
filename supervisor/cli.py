"""`arcp-supervisor`: the command line (typer only; everything else is elsewhere)."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Annotated, Any, Optional

import typer

from supervisor import __version__
from supervisor.config import (
    Config, ConfigError, Limits, check, load_file, log_setting, parse_agent_flag, parse_size, with_environment_flags,
)

# Help is Markdown (so that `[@VERSION]` or `[sandbox]` in a help text is shown as written, and a
# docstring's lines are joined); `run`'s options are grouped in panels, which keeps each table
# narrow enough that no option name is cut at 80 columns (tests/unit/test_cli_help.py).
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="ARCP v1.1 runtime with sandboxed workers.")
_SERVING, _ACCESS, _STATE = "Serving", "Agents and access", "Sessions and state"
_JOBS, _STOPPING, _CAPACITY, _LOGS = "Per-job limits", "Workers and stopping", "Capacity", "Logs"


def _version(value: bool) -> None:
    if value:
        print(f"arcp-supervisor {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """ARCP v1.1 runtime that runs every job in its own sandboxed worker process."""


def _fail(msg: str, code: int = 2) -> None:
    from supervisor.logs import json_enabled

    if json_enabled():  # the log is JSON lines by now: this line too
        import logging

        logging.getLogger("arcp").error("arcp-supervisor: error: %s", msg)
    else:
        print(f"arcp-supervisor: error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


@app.command()
def run(
    config: Annotated[Optional[str], typer.Option(
        "--config", help="TOML config file; flags override its settings.")] = None,
    host: Annotated[Optional[str], typer.Option(
        "--host", rich_help_panel=_SERVING,
        help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(
        "--port", rich_help_panel=_SERVING,
        help="Port; 0 picks one (default 7777).")] = None,
    path: Annotated[Optional[str], typer.Option(
        "--path", rich_help_panel=_SERVING,
        help="WebSocket path (default /arcp).")] = None,
    stdio: Annotated[Optional[bool], typer.Option(
        "--stdio", rich_help_panel=_SERVING,
        help="Serve one session on stdin/stdout.")] = None,
    agent: Annotated[Optional[list[str]], typer.Option(
        "--agent", rich_help_panel=_ACCESS,
        help="An agent to serve: NAME[@VERSION]=MODULE:FUNCTION (repeatable).")] = None,
    agent_python: Annotated[Optional[list[str]], typer.Option(
        "--agent-python", rich_help_panel=_ACCESS,
        help="NAME=PATH: the interpreter NAME's jobs run on, typically its own venv's bin/python "
             "(repeatable).")] = None,
    agent_path: Annotated[Optional[list[str]], typer.Option(
        "--agent-path", rich_help_panel=_ACCESS,
        help="NAME=DIR: a directory NAME's jobs import from, first on their import path "
             "(repeatable).")] = None,
    default: Annotated[Optional[list[str]], typer.Option(
        "--default", rich_help_panel=_ACCESS,
        help="NAME@VERSION: the version a bare NAME runs (repeatable).")] = None,
    token: Annotated[Optional[list[str]], typer.Option(
        "--token", rich_help_panel=_ACCESS,
        help="TOKEN=PRINCIPAL (repeatable); without one, no authentication and loopback only.")] = None,
    state_dir: Annotated[Optional[str], typer.Option(
        "--state-dir", rich_help_panel=_STATE,
        help="Directory for durable state (default: in memory).")] = None,
    state_url: Annotated[Optional[str], typer.Option(
        "--state-url", rich_help_panel=_STATE,
        help="postgresql://USER@HOST:PORT/DB: durable state in PostgreSQL, shared by several "
             "supervisor processes (instead of --state-dir).")] = None,
    node_id: Annotated[Optional[str], typer.Option(
        "--node-id", rich_help_panel=_STATE,
        help="This process's id among those sharing --state-url (default HOSTNAME-PID).")] = None,
    node_heartbeat: Annotated[Optional[float], typer.Option(
        "--node-heartbeat", rich_help_panel=_STATE,
        help="Seconds between renewals of this process's liveness in --state-url (default 2).")] = None,
    node_timeout: Annotated[Optional[float], typer.Option(
        "--node-timeout", rich_help_panel=_STATE,
        help="Seconds of silence after which the other processes declare one lost (default 10; "
             "at least twice --node-heartbeat).")] = None,
    memory: Annotated[Optional[str], typer.Option(
        "--memory", rich_help_panel=_JOBS,
        help="Per-job memory (default 1G).")] = None,
    cpu_time: Annotated[Optional[int], typer.Option(
        "--cpu-time", rich_help_panel=_JOBS,
        help="Per-job CPU seconds (default 300).")] = None,
    max_procs: Annotated[Optional[int], typer.Option(
        "--max-procs", rich_help_panel=_JOBS,
        help="Per-job processes (default 64).")] = None,
    max_open_files: Annotated[Optional[int], typer.Option(
        "--max-open-files", rich_help_panel=_JOBS,
        help="Per-job open files (default 1024).")] = None,
    max_file_size: Annotated[Optional[str], typer.Option(
        "--max-file-size", rich_help_panel=_JOBS,
        help="Per-job file size (default 1G).")] = None,
    grace: Annotated[Optional[float], typer.Option(
        "--grace", rich_help_panel=_STOPPING,
        help="Seconds before a stopped job is killed (default 1.0).")] = None,
    drain_timeout: Annotated[Optional[float], typer.Option(
        "--drain-timeout", rich_help_panel=_STOPPING,
        help="Seconds running jobs may go on after SIGTERM or SIGINT before they are cancelled "
             "(default 30).")] = None,
    reuse_workers: Annotated[Optional[int], typer.Option(
        "--reuse-workers", rich_help_panel=_STOPPING,
        help="Jobs per worker process (default 1).")] = None,
    heartbeat_interval: Annotated[Optional[int], typer.Option(
        "--heartbeat-interval", rich_help_panel=_STATE,
        help="Seconds between pings of a quiet client (default 30).")] = None,
    resume_window: Annotated[Optional[int], typer.Option(
        "--resume-window", rich_help_panel=_STATE,
        help="Seconds a disconnected session stays resumable (default 600).")] = None,
    retention_jobs: Annotated[Optional[int], typer.Option(
        "--retention-jobs", rich_help_panel=_STATE,
        help="Finished jobs kept (default 10000).")] = None,
    retention_seconds: Annotated[Optional[int], typer.Option(
        "--retention-seconds", rich_help_panel=_STATE,
        help="Seconds finished jobs are kept (default 86400).")] = None,
    max_result_bytes: Annotated[Optional[str], typer.Option(
        "--max-result-bytes", rich_help_panel=_JOBS,
        help="Streamed result cap (default 32M).")] = None,
    chunk_size: Annotated[Optional[str], typer.Option(
        "--chunk-size", rich_help_panel=_JOBS,
        help="result_chunk size (default 256K).")] = None,
    ws_compression: Annotated[Optional[bool], typer.Option(
        "--ws-compression/--no-ws-compression", rich_help_panel=_SERVING,
        help="Accept permessage-deflate (default no).")] = None,
    metrics: Annotated[Optional[bool], typer.Option(
        "--metrics/--no-metrics", rich_help_panel=_SERVING,
        help="Serve /metrics and keep its counters (default yes).")] = None,
    usage: Annotated[Optional[bool], typer.Option(
        "--usage/--no-usage", rich_help_panel=_JOBS,
        help="Measure each job's CPU, memory and tasks (default yes; no: wall time only).")] = None,
    back_pressure_threshold: Annotated[Optional[int], typer.Option(
        "--back-pressure-threshold", rich_help_panel=_STATE,
        help="Unacked events after which an acking client gets a back_pressure status (default 0: off).")] = None,
    tmp_size: Annotated[Optional[str], typer.Option(
        "--tmp-size", rich_help_panel=_JOBS,
        help="Cap of each job's private temp dir, a tmpfs of its own (default 256M; "
             "at most half the job's memory limit).")] = None,
    egress_header_timeout: Annotated[Optional[float], typer.Option(
        "--egress-header-timeout", rich_help_panel=_JOBS,
        help="Seconds a job's request to the egress proxy may take to send its head (default 10).")] = None,
    session_log_bytes: Annotated[Optional[str], typer.Option(
        "--session-log-bytes", rich_help_panel=_STATE,
        help="Bytes of frames kept per session for resume and subscribe history; "
             "older frames drop out (default 64M).")] = None,
    allow_shared_uid: Annotated[Optional[bool], typer.Option(
        "--allow-shared-uid", rich_help_panel=_ACCESS,
        help="Start even though jobs would run under the supervisor's own uid "
             "(a supervisor that is not root); `doctor` names what is then not "
             "enforced.")] = None,
    max_jobs: Annotated[Optional[int], typer.Option(
        "--max-jobs", rich_help_panel=_CAPACITY,
        help="Jobs running at once, all principals; the others wait in order (default 256).")] = None,
    max_queued: Annotated[Optional[int], typer.Option(
        "--max-queued", rich_help_panel=_CAPACITY,
        help="Jobs waiting to start; beyond it a submit is refused as overloaded "
             "(default 10000).")] = None,
    memory_budget: Annotated[Optional[str], typer.Option(
        "--memory-budget", rich_help_panel=_CAPACITY,
        help="The sum of the memory limits of running jobs (default 80% of the memory "
             "available to the supervisor: its cgroup's limit, else the host's).")] = None,
    max_runtime: Annotated[Optional[int], typer.Option(
        "--max-runtime", rich_help_panel=_JOBS,
        help="Seconds a job may run, counted from its start (default 3600; a client's "
             "max_runtime_sec is clamped to it).")] = None,
    log_format: Annotated[Optional[str], typer.Option(
        "--log-format", rich_help_panel=_LOGS,
        help="text or json: one JSON object per line (default text).")] = None,
    log_level: Annotated[Optional[str], typer.Option(
        "--log-level", rich_help_panel=_LOGS,
        help="debug, info, warning or error (default info).")] = None,
) -> None:
    """Serve ARCP v1.1 over WebSocket (default) or stdio."""
    flags = dict(locals())
    try:
        cfg = build_config(flags)
    except ConfigError as e:
        _fail(str(e))
        return
    from supervisor.server.app import NodeFenced, run as run_app
    from supervisor.state.base import StoreError

    try:
        # SIGHUP: the file read again, the same flags over it
        run_app(cfg, reload=(lambda: build_config(flags)) if config else None)
    except ConfigError as e:  # found only when the runtime starts (e.g. a provisioner that will not load)
        _fail(str(e))
    except (StoreError, NodeFenced) as e:  # the state database cannot be opened; declared lost
        _fail(str(e), 1)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of lines.")] = False,
    config: Annotated[Optional[str], typer.Option(
        "--config", help="TOML config file: its [sandbox] job uids and its agents are checked.")] = None,
    agent: Annotated[Optional[list[str]], typer.Option(
        "--agent", help="NAME[@VERSION]=MODULE:FUNCTION to import in a sandboxed worker (repeatable)")] = None,
    agent_python: Annotated[Optional[list[str]], typer.Option(
        "--agent-python", help="NAME=PATH: the interpreter NAME's jobs run on (repeatable).")] = None,
    agent_path: Annotated[Optional[list[str]], typer.Option(
        "--agent-path", help="NAME=DIR: a directory NAME's jobs import from (repeatable).")] = None,
    allow_shared_uid: Annotated[bool, typer.Option(
        "--allow-shared-uid", help="Accept that jobs share the supervisor's uid (not root): exit 0 if "
                                   "that is all that is missing.")] = False,
) -> None:
    """Print the isolation layers this host offers and whether `run` uses them.

    Exits 0 when every guarantee of a job's sandbox is enforced here (and every agent given
    imports in a sandboxed worker), 1 otherwise.
    """
    from supervisor.config import ConfigError, load_file
    from supervisor.doctor import agents_report, report

    job_uids = None
    cfg = None
    try:
        if config is not None:
            loaded = load_file(config)
            job_uids = loaded.get("job_uids")
            allow_shared_uid = allow_shared_uid or bool(loaded.get("allow_shared_uid"))
            if loaded.get("agents"):
                agent = agent or []
        if agent is not None:  # agents to check: a whole run config, checked as `run` would
            cfg = build_config({"config": config, "agent": agent, "allow_shared_uid": allow_shared_uid or None,
                                "agent_python": agent_python, "agent_path": agent_path})
    except ConfigError as e:
        typer.echo(f"arcp-supervisor: {e}", err=True)
        raise typer.Exit(2) from None
    text, status = report(as_json, job_uids, allow_shared_uid)
    if cfg is not None and cfg.agents:
        lines, agents_ok = agents_report(cfg, as_json)
        text = _merge(text, lines, as_json)
        status = status or (0 if agents_ok else 1)
    print(text)
    raise typer.Exit(status)


def _merge(text: str, agent_lines: list[str], as_json: bool) -> str:
    if not as_json:
        return "\n".join([text, ""] + agent_lines)
    import json

    data = json.loads(text)
    data["agents"] = agent_lines
    data["ok"] = data["ok"] and not any(" FAILED: " in line for line in agent_lines)
    return json.dumps(data, indent=2)


def build_config(flags: dict[str, Any]) -> Config:
    base: dict[str, Any] = load_file(flags["config"]) if flags.get("config") else {}
    limits: Limits = base.pop("limits", Limits())
    file_agents = base.pop("agents", ())
    lim: dict[str, int] = {}
    if flags.get("memory") is not None:
        lim["memory"] = parse_size(flags["memory"], "--memory")
    if flags.get("max_file_size") is not None:
        lim["max_file_size"] = parse_size(flags["max_file_size"], "--max-file-size")
    for key in ("cpu_time", "max_procs", "max_open_files", "max_runtime"):
        v = flags.get(key)
        if v is not None:
            if v <= 0:
                raise ConfigError(f"--{key.replace('_', '-')}: must be a positive integer")
            lim[key] = v
    limits = replace(limits, **lim)
    agents = [replace(a, limits=replace(a.limits, **lim)) for a in file_agents]
    agents += [parse_agent_flag(a, limits) for a in flags.get("agent") or []]
    agents = with_environment_flags(agents, flags.get("agent_python") or [], flags.get("agent_path") or [])
    tokens = dict(base.pop("tokens", {}))
    for t in flags.get("token") or []:
        tok, sep, principal = t.partition("=")
        if not sep or not tok or not principal:
            raise ConfigError(f"--token {t!r}: expected TOKEN=PRINCIPAL")
        tokens[tok] = principal
    for key in ("host", "port", "path", "stdio", "state_dir", "state_url", "node_id", "node_heartbeat",
                "node_timeout", "grace", "drain_timeout", "reuse_workers", "heartbeat_interval",
                "resume_window", "retention_jobs", "retention_seconds", "ws_compression", "metrics", "usage",
                "back_pressure_threshold", "egress_header_timeout", "allow_shared_uid", "max_jobs",
                "max_queued"):
        if flags.get(key) is not None:
            base[key] = flags[key]
    for key in ("max_result_bytes", "chunk_size", "tmp_size", "session_log_bytes", "memory_budget"):
        if flags.get(key) is not None:
            base[key] = parse_size(flags[key], f"--{key.replace('_', '-')}")
    for key in ("log_format", "log_level"):
        if flags.get(key) is not None:
            base[key] = log_setting(key, flags[key], f"--{key.replace('_', '-')}")
    for key in ("retention_jobs", "retention_seconds", "resume_window"):
        if key in base and base[key] <= 0:
            raise ConfigError(f"--{key.replace('_', '-')}: must be a positive integer")
    defaults = tuple(flags.get("default") or ())
    cfg = Config(limits=limits, agents=tuple(agents), tokens=tokens, defaults=defaults, **base)
    return check(cfg)


# -- the shell client: subcommands that speak ARCP to a running server (supervisor.shell) --
def _url_option() -> Any:
    return typer.Option("--url", envvar="ARCP_URL", show_envvar=True,
                        help="The server's WebSocket URL (default $ARCP_URL or ws://127.0.0.1:7777/arcp).")


def _token_option() -> Any:
    return typer.Option("--token", envvar="ARCP_TOKEN", show_envvar=True, show_default=False,
                        help="Bearer token (default $ARCP_TOKEN).")


def _default_url() -> str:
    from supervisor.shell.connection import DEFAULT_URL

    return DEFAULT_URL


@app.command()
def submit(
    agent: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    input_: Annotated[Optional[str], typer.Option(
        "--input", help="The job's input: JSON, @FILE (JSON read from FILE) or - (JSON read from stdin); "
                        "default {}.")] = None,
    lease: Annotated[Optional[str], typer.Option(
        "--lease", help='The lease requested, a JSON object, e.g. \'{"fs.read": ["/data/**"]}\'.')] = None,
    limit: Annotated[Optional[list[str]], typer.Option(
        "--limit", help="KEY=VALUE, a tighter limit for this job (memory_mb, cpu_sec, max_procs, "
                        "max_open_files, max_file_size_mb, runtime_sec); repeatable.")] = None,
    max_runtime: Annotated[Optional[int], typer.Option(
        "--max-runtime", min=1, max=86400, help="Seconds the job may run (max_runtime_sec).")] = None,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Exit once the job is accepted, printing only its id on stdout.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Every frame of the job as one JSON line on stdout, instead of the result.")] = False,
    url: Annotated[Optional[str], _url_option()] = None,
    token: Annotated[Optional[str], _token_option()] = None,
) -> None:
    """Submit a job and follow it to its end; the result goes to stdout.

    The job id and its log go to stderr, with a progress bar on a terminal. Exits 0 when the job succeeds, 1 when it ends in error (its code and message on
    stderr), 2 on a usage error, 3 when the server cannot be reached or refuses the
    session, 130 on Ctrl-C (the job is cancelled first).
    """
    from supervisor.shell.follow import SubmitArgs, submit as run_submit

    raise typer.Exit(run_submit(SubmitArgs(
        url=url or _default_url(), token=token, agent=agent, input=input_, lease=lease, limits=limit or [],
        max_runtime=max_runtime, detach=detach, as_json=as_json)))


@app.command()
def jobs(
    status: Annotated[Optional[list[str]], typer.Option(
        "--status", help="Only jobs in this status (pending, running, success, error, cancelled, "
                         "timed_out); repeatable or comma-separated.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job instead of a table.")] = False,
    url: Annotated[Optional[str], _url_option()] = None,
    token: Annotated[Optional[str], _token_option()] = None,
) -> None:
    """List the jobs this principal may see (every principal's, for an admin)."""
    from supervisor.shell.jobs import jobs as run_jobs

    raise typer.Exit(run_jobs(url or _default_url(), token, status or [], as_json))


@app.command()
def watch(
    job_id: Annotated[str, typer.Argument(help="The job to follow.")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="Every frame of the job as one JSON line on stdout, instead of the result.")] = False,
    url: Annotated[Optional[str], _url_option()] = None,
    token: Annotated[Optional[str], _token_option()] = None,
) -> None:
    """Follow a job, its history first, then live; exits like `submit`.

    Ctrl-C stops following (exit 130) and leaves the job running.
    """
    from supervisor.shell.follow import watch as run_watch

    raise typer.Exit(run_watch(url or _default_url(), token, job_id, as_json))


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel.")],
    reason: Annotated[Optional[str], typer.Option("--reason", help="Why (sent with job.cancel).")] = None,
    url: Annotated[Optional[str], _url_option()] = None,
    token: Annotated[Optional[str], _token_option()] = None,
) -> None:
    """Cancel a job (another session's job takes an admin) and wait for it to end.

    Exits 0 once the job has ended, 1 if the server refuses (e.g. JOB_NOT_FOUND) or the
    job has not ended 10 s after the cancel.
    """
    from supervisor.shell.jobs import cancel as run_cancel

    raise typer.Exit(run_cancel(url or _default_url(), token, job_id, reason))


@app.command()
def top(
    url: Annotated[Optional[str], _url_option()] = None,
    token: Annotated[Optional[str], _token_option()] = None,
) -> None:
    """A live table of running and queued jobs, CPU and memory against their limits.

    Refreshed every second; q or Ctrl-C quits. Off a terminal: one snapshot.
    """
    from supervisor.shell.top import top as run_top

    raise typer.Exit(run_top(url or _default_url(), token))


if __name__ == "__main__":  # pragma: no cover
    app()
