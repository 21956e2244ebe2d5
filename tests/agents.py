"""Agents the project's own tests register with a real server (`tests.agents:NAME`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

from shared.errors import PermissionDenied
from worker import JobContext


async def echo(input: Any, job: JobContext) -> Any:
    job.log("info", "echoing")
    return {"echo": input}


def sync_echo(input: Any, job: JobContext) -> Any:
    return {"echo": input, "sync": True}


def logs(input: Any, job: JobContext) -> Any:
    n = int(input.get("n", 10))
    for i in range(n):
        job.log("info", f"log {i}")
    return {"n": n}


async def sleep(input: Any, job: JobContext) -> Any:
    job.log("info", "sleeping")
    await asyncio.sleep(float(input.get("seconds", 1.0)))
    return {"slept": True}


async def ticker(input: Any, job: JobContext) -> Any:
    n = int(input.get("n", 10))
    for i in range(n):
        job.log("info", f"tick {i}")
        await asyncio.sleep(float(input.get("interval", 0.05)))
    return {"ticks": n}


def busy(input: Any, job: JobContext) -> Any:
    """Spins in pure Python without calling the job: cancel must interrupt it."""
    job.log("info", "spinning")
    x = 0
    while True:
        x += 1


def stubborn(input: Any, job: JobContext) -> Any:
    """Ignores cancellation and SIGTERM: only the kill ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job.log("info", f"pid {os.getpid()}")
    while True:
        try:
            time.sleep(0.05)
        except BaseException:
            continue


def stream(input: Any, job: JobContext) -> None:
    size = int(input.get("size", 1024))
    data = bytes(range(256)) * (size // 256 + 1)
    with job.stream_result("base64") as w:
        w.write(data[:size])


def stream_text(input: Any, job: JobContext) -> None:
    with job.stream_result("utf8") as w:
        w.write(input.get("text", "hello"))


def printer(input: Any, job: JobContext) -> Any:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    return {"printed": True}


def raises(input: Any, job: JobContext) -> Any:
    raise ValueError(input.get("message", "boom"))


def denies(input: Any, job: JobContext) -> Any:
    raise PermissionDenied("agent says no", details={"why": "test"})


def suicide(input: Any, job: JobContext) -> Any:
    """The worker kills itself with SIGKILL mid-job."""
    job.log("info", "about to die")
    os.kill(os.getpid(), signal.SIGKILL)
    return None


def garbage(input: Any, job: JobContext) -> Any:
    """Writes bytes that are not a frame onto the supervisor pipe."""
    sock = job._ch.sock
    sock.sendall(b"\xff\xff\xff\xffnot a frame at all")
    time.sleep(5)
    return None


def other_job(input: Any, job: JobContext) -> Any:
    """Sends a well-formed frame that claims to be about another job."""
    job._ch.send(["ev", "job_01ARZ3NDEKTSV4RRFFQ69G5FAV", "log", ["info", "forged", None]])
    time.sleep(5)
    return None


def big_result(input: Any, job: JobContext) -> Any:
    return {"blob": "x" * int(input.get("size", 2 * 1024 * 1024))}


def identity(input: Any, job: JobContext) -> Any:
    return {"job_id": job.job_id, "session_id": job.session_id, "trace_id": job.trace_id,
            "agent": job.agent, "lease": job.lease, "pid": os.getpid(),
            "env": sorted(os.environ)}


def read_path(input: Any, job: JobContext) -> Any:
    try:
        with open(input["path"], "rb") as f:
            return {"ok": True, "data": f.read(64).decode("utf-8", "replace")}
    except OSError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def write_path(input: Any, job: JobContext) -> Any:
    try:
        with open(input["path"], "wb") as f:
            f.write(b"x" * int(input.get("size", 10)))
        return {"ok": True}
    except OSError as e:
        if input.get("raise"):
            raise
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def open_many(input: Any, job: JobContext) -> Any:
    fds = []
    try:
        for _ in range(int(input.get("n", 500))):
            fds.append(os.open(os.devnull, os.O_RDONLY))
    finally:
        for fd in fds:
            os.close(fd)
    return {"opened": len(fds)}


def hog(input: Any, job: JobContext) -> Any:
    blocks = []
    for _ in range(int(input.get("mb", 512)) // 8):
        blocks.append(bytearray(b"x") * (8 * 1024 * 1024))
        time.sleep(0.01)
    return {"allocated": len(blocks) * 8}


def spin(input: Any, job: JobContext) -> Any:
    x = 0
    while True:
        x += 1


def tmp_and_net(input: Any, job: JobContext) -> Any:
    import socket
    import tempfile

    found = sorted(os.listdir(tempfile.gettempdir()))  # what an earlier job may have left
    path = os.path.join(tempfile.gettempdir(), "scratch.txt")
    with open(path, "w") as f:
        f.write("mine")
    try:
        socket.create_connection(("127.0.0.1", int(input["port"])), timeout=2).close()
        net = "connected"
    except OSError as e:
        net = f"{type(e).__name__}: {e}"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", int(input["port"])))
        udp = "sent"
    except OSError as e:
        udp = f"{type(e).__name__}: {e}"
    interfaces = sorted(name for _, name in socket.if_nameindex())
    return {"home": os.environ.get("HOME"), "tmp": tempfile.gettempdir(), "wrote": path, "found": found,
            "pid": os.getpid(), "net": net,
            "udp": udp, "interfaces": interfaces}


def status(input: Any, job: JobContext) -> Any:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    out: dict[str, Any] = {k: fields[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs")}
    out.update(uid=os.getresuid(), gid=os.getresgid(), groups=os.getgroups(),
               home_owner=os.stat(os.environ["HOME"]).st_uid)
    time.sleep(float(input.get("hold", 0)) if isinstance(input, dict) else 0)
    return out


def _name_self(tag: str) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(15, tag.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def fork_bomb(input: Any, job: JobContext) -> Any:
    """Forks until refused (the error is not caught); children sleep under `tag`."""
    for _ in range(int(input.get("n", 200))):
        if os.fork() == 0:
            _name_self(input["tag"])
            time.sleep(30)
            os._exit(0)
    return {"forked": True}


def forbidden_syscalls(input: Any, job: JobContext) -> Any:
    """Try what the seccomp filter refuses; report each errno (0 means it worked)."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    tries = {
        "ptrace": lambda: libc.ptrace(0, 0, None, None),            # PTRACE_TRACEME
        "unshare": lambda: libc.unshare(0x10000000),                 # CLONE_NEWUSER
        "mount": lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
        "keyctl": lambda: libc.syscall(250, 0, 0, 0, 0, 0),           # keyctl (x86_64)
        "bpf": lambda: libc.syscall(321, 0, None, 0),                 # bpf (x86_64)
        "io_uring_setup": lambda: libc.syscall(425, 1, None),         # io_uring_setup
        "clone3": lambda: libc.syscall(435, None, 0),                 # clone3
        "userfaultfd": lambda: libc.syscall(323, 0),                  # userfaultfd (x86_64)
    }
    out = {}
    for name, call in tries.items():
        ctypes.set_errno(0)
        r = call()
        out[name] = ctypes.get_errno() if r == -1 else 0
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    out["threads_work"] = True
    return out


def lease_ops(input: Any, job: JobContext) -> Any:
    out = []
    for cap, target in input["ops"]:
        try:
            job.validate_lease_op(cap, target)
            out.append("allowed")
        except Exception as e:
            out.append(getattr(e, "code", type(e).__name__))
    return out


def delegator(input: Any, job: JobContext) -> Any:
    """Starts a child job; optionally waits before returning (its end ends the child)."""
    child = job.delegate(input["agent"], input.get("input"), input.get("lease"))
    budget = {k: str(v) for k, v in job.budget().items()}
    time.sleep(float(input.get("wait", 0)))
    return {"child": child, "budget": budget}


def creds(input: Any, job: JobContext) -> Any:
    """Reports its credentials (ids and whether the environment holds them) and rotates one."""
    ids = [c["id"] for c in job.credentials]
    in_env = any(c["value"] in v for c in job.credentials for v in os.environ.values())
    if ids and input.get("rotate"):
        job.rotate_credential(ids[0], input["rotate"])
    time.sleep(float(input.get("wait", 0)))
    return {"ids": ids, "in_env": in_env, "schemes": [c["scheme"] for c in job.credentials]}


def _errno_of(fn: Any) -> str:
    """"ok" if `fn()` worked, else the name of the errno it failed with."""
    import errno

    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def attacks(input: Any, job: JobContext) -> Any:
    """Escape attempts; each entry says how it failed ("ok" means it worked)."""
    import signal as sig
    import socket

    granted = input["granted"]
    out: dict[str, str] = {}
    def symlink_swap() -> None:
        os.symlink(input["outside"], os.path.join(granted, "swap"))
        with open(os.path.join(granted, "swap", "secret.txt")) as f:
            f.read()

    out["symlink_swap"] = _errno_of(symlink_swap)
    out["hardlink"] = _errno_of(lambda: os.link(os.path.join(input["outside"], "secret.txt"),
                                              os.path.join(granted, "hl")))
    out["mknod"] = _errno_of(lambda: os.mknod(os.path.join(granted, "dev"), 0o600 | 0o020000, os.makedev(1, 3)))
    out["parent_environ"] = _errno_of(lambda: open(f"/proc/{os.getppid()}/environ", "rb").read())
    out["supervisor_environ"] = _errno_of(lambda: open(f"/proc/{input['supervisor']}/environ", "rb").read())
    out["signal_supervisor"] = _errno_of(lambda: os.kill(int(input["supervisor"]), 0))
    out["signal_other_job"] = _errno_of(lambda: os.kill(int(input["other"]), 0))
    out["ptrace_other_job"] = _errno_of(lambda: open(f"/proc/{input['other']}/mem", "rb").read(1))
    def unix_connect() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(input["unix"])

    out["unix_socket"] = _errno_of(unix_connect)
    kinds = []
    for fd in sorted(int(fd) for fd in os.listdir("/proc/self/fd")):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the directory listing's own descriptor, already closed
        if target.startswith("socket:"):
            with socket.socket(fileno=os.dup(fd)) as probe:
                target = f"socket:{probe.family.name}"
        kinds.append(target if not target.startswith(("pipe:", "anon_inode:")) else target.split(":")[0])
    out["fds"] = ",".join(sorted(set(kinds)))
    out["ignores"] = str(sig.SIG_IGN)
    out["setuid_copy"] = _setuid_copy(os.path.join(input["outside"], "secret.txt"))
    out.update(_tty_attacks())
    return out


def _setuid_copy(secret: str) -> str:
    """Copy binaries into the private temp dir, make them setuid root, run them: do they gain
    a capability (change uid, chown away) or read outside the lease?"""
    import shutil
    import subprocess

    def setuid(src: str) -> str:
        exe = os.path.join(os.environ["TMPDIR"], os.path.basename(src))
        shutil.copy(src, exe)
        os.chmod(exe, 0o4755)
        return exe

    mine = os.path.join(os.environ["TMPDIR"], "mine")
    open(mine, "w").close()
    tries = {"setresuid": [setuid("/usr/bin/setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", "true"],
             "chown": [setuid("/bin/chown"), "65534", mine], "read": [setuid("/bin/cat"), secret]}
    errors = []
    for name, argv in tries.items():
        r = subprocess.run(argv, capture_output=True, timeout=10)
        if r.returncode == 0:
            return "ok"  # the setuid copy got what it asked for
        errors.append(f"{name}: {r.stderr.decode(errors='replace').strip()[-80:]}")
    return "refused: " + "; ".join(errors)


def _tty_attacks() -> dict[str, str]:
    """Terminal injection: TIOCSTI/TIOCLINUX on stdin (also with high bits set in the request,
    which the kernel drops), and reaching any terminal at all."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)

    def ioctl(req: int) -> str:
        ch = ctypes.c_char(b"x")
        if libc.ioctl(0, ctypes.c_ulong(req), ctypes.byref(ch)) == 0:
            return "ok"
        return errno.errorcode.get(ctypes.get_errno(), "?")

    return {"tiocsti": ioctl(0x5412), "tiocsti_high_bits": ioctl((1 << 32) | 0x5412),
            "tioclinux": ioctl(0x541C), "open_tty": _errno_of(lambda: os.open("/dev/tty", os.O_RDWR)),
            "openpty": _errno_of(os.openpty)}


def fill_disk(input: Any, job: JobContext) -> Any:
    """Write into the private temp dir until the kernel says no; raise it if asked."""
    import errno

    path = os.path.join(os.environ["TMPDIR"], "fill")
    block = b"\0" * (1 << 20)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while written < 8 << 30:
            written += os.write(fd, block)
    except OSError as e:
        if input.get("raise"):
            raise
        return {"written_mb": written >> 20, "error": errno.errorcode.get(e.errno or 0, str(e.errno))}
    finally:
        os.close(fd)
    return {"written_mb": written >> 20, "error": None}


def grandchild_then(input: Any, job: JobContext) -> Any:
    """Leaves a setsid() grandchild named `tag`, then ends as asked: return, sleep (to be
    cancelled or timed out)."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            _name_self(input["tag"])
            time.sleep(60)
        os._exit(0)
    job.log("info", "grandchild left")
    if input.get("then") == "sleep":
        time.sleep(60)
    return {"left": True}


def fetch(input: Any, job: JobContext) -> Any:
    """GET (or POST `data`) `url` with urllib, through whatever proxy the environment names."""
    import urllib.error
    import urllib.request

    data = input.get("data")
    req = urllib.request.Request(input["url"], data=data.encode() if data is not None else None,
                                 headers=input.get("headers") or {})
    try:
        with urllib.request.urlopen(req, timeout=float(input.get("timeout", 10))) as r:
            body = r.read()
            return {"ok": True, "status": r.status, "size": len(body), "body": body[:4096].decode("latin-1")}
    except urllib.error.HTTPError as e:
        return {"ok": False, "status": e.code, "body": e.read()[:4096].decode("utf-8", "replace")}
    except Exception as e:
        return {"ok": False, "status": None, "error": f"{type(e).__name__}: {e}"}


def httpx_fetch(input: Any, job: JobContext) -> Any:
    """GET `url` with httpx (trust_env: the proxy variables), several times if asked."""
    import httpx

    out = []
    with httpx.Client(timeout=float(input.get("timeout", 10))) as client:
        for _ in range(int(input.get("times", 1))):
            try:
                r = client.get(input["url"])
                out.append({"status": r.status_code, "size": len(r.content), "body": r.text[:4096]})
            except httpx.HTTPError as e:
                out.append({"status": None, "error": f"{type(e).__name__}: {e}"})
    return out[0] if len(out) == 1 else out


def net_escape(input: Any, job: JobContext) -> Any:
    """Reach around the proxy: raw TCP, DNS, UDP (loopback or made-up names only)."""
    import socket

    out: dict[str, str] = {}

    def attempt(name: str, fn: Any) -> None:
        try:
            fn()
            out[name] = "ok"
        except OSError as e:
            out[name] = f"{type(e).__name__}: {e}"

    port = int(input["port"])
    attempt("tcp", lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close())
    attempt("tcp6", lambda: socket.create_connection(("::1", port), timeout=2).close())
    attempt("dns_localhost", lambda: socket.getaddrinfo("localhost", port))
    attempt("dns_name", lambda: socket.getaddrinfo("arcp-test.invalid", 80))
    attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 53)))
    attempt("bind", lambda: socket.socket().bind(("127.0.0.1", 0)))
    proxy = os.environ.get("HTTP_PROXY", "")
    if proxy:
        other = int(input.get("other_proxy_port") or 0)
        if other:
            attempt("other_proxy", lambda: socket.create_connection(("127.0.0.1", other), timeout=2).close())

        def fastopen() -> None:
            s = socket.socket()
            s.sendto(b"GET / HTTP/1.1\r\n\r\n", 0x20000000, ("127.0.0.1", other or port))
        attempt("fastopen", fastopen)
    out["proxy"] = proxy
    return out


def flood(input: Any, job: JobContext) -> Any:
    """`n` log events of `size` bytes each, numbered."""
    n, size = int(input.get("n", 100)), int(input.get("size", 512 * 1024))
    for i in range(n):
        job.log("info", f"{i}:" + "x" * size)
    return {"n": n}


def watch_budget(input: Any, job: JobContext) -> Any:
    """Delegates a child, then waits (up to `wait` s) for the budget to change: the child spends it."""
    child = job.delegate(input["agent"], input.get("input"), input.get("lease"))
    start = {k: str(v) for k, v in job.budget().items()}
    deadline = time.monotonic() + float(input.get("wait", 5))
    budget = start
    while budget == start and time.monotonic() < deadline:
        time.sleep(0.05)
        budget = {k: str(v) for k, v in job.budget().items()}
    return {"child": child, "after_delegate": start, "budget": budget}


def own_limits(input: Any, job: JobContext) -> Any:
    """Reports the rlimits it runs under and its budget; spends `spend` of `currency` first."""
    import resource

    spend = input.get("spend") if isinstance(input, dict) else None
    before = {k: str(v) for k, v in job.budget().items()}
    if spend:
        job.metric("cost.test", float(spend), input.get("currency", "USD"))
    return {"cpu_sec": resource.getrlimit(resource.RLIMIT_CPU)[0],
            "max_procs": resource.getrlimit(resource.RLIMIT_NPROC)[0],
            "max_open_files": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "budget": before, "budget_after": {k: str(v) for k, v in job.budget().items()}}


def forged_fail(input: Any, job: JobContext) -> Any:
    """Ends its job with a hand-made fail frame: a huge traceback that tries to forge log records."""
    line = "\n2099-01-01 00:00:00,000 WARNING arcp.jobs: job forged: \x1b[2Jforged record\r"
    tb = "Traceback (most recent call last):\n" + "x" * int(input.get("size", 4 * 1000 * 1000)) + line * 100
    job._ch.send(["fail", job.job_id, {"code": "INTERNAL_ERROR", "message": "forged", "traceback": tb}])
    time.sleep(5)
    return None


_HELD: list[Any] = []  # connections a job leaves open (kept across jobs of a reused worker)


def raw_proxy(input: Any, job: JobContext) -> Any:
    """Speak raw bytes to the job's proxy: `send` (latin-1), sent `slow`ly if asked; read the answer."""
    import socket
    import time as _time

    port = int(os.environ["HTTP_PROXY"].rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=float(input.get("timeout", 10)))
    data = input["send"].encode("latin-1") * int(input.get("repeat", 1))
    try:
        if input.get("slow"):
            for b in data[:int(input.get("slow_bytes", 20))]:
                s.sendall(bytes([b]))
                _time.sleep(float(input["slow"]))
        else:
            s.sendall(data)
    except OSError:
        pass  # the proxy stopped listening: read what it said
    if input.get("hold"):  # read the tunnel's answer, then keep the connection and return
        answer = s.recv(4096)
        if input.get("then_send"):
            s.sendall(input["then_send"].encode("latin-1"))
        _HELD.append(s)
        return {"answer": answer.decode("latin-1")}
    chunks: list[bytes] = []
    until = input.get("until", "").encode("latin-1")
    try:
        while sum(map(len, chunks)) < 65536:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
            if until and b"".join(chunks).endswith(until):
                break
    except OSError as e:
        chunks.append(f"[{type(e).__name__}]".encode())
    s.close()
    return {"answer": b"".join(chunks)[:8192].decode("latin-1")}


REGISTRY = [
    "echo@1.0.0=tests.agents:echo", "echo@2.0.0=tests.agents:sync_echo", "logs=tests.agents:logs",
    "sleep=tests.agents:sleep", "ticker=tests.agents:ticker", "busy=tests.agents:busy", "stubborn=tests.agents:stubborn",
    "stream=tests.agents:stream", "streamtext=tests.agents:stream_text", "printer=tests.agents:printer",
    "raises=tests.agents:raises", "denies=tests.agents:denies", "suicide=tests.agents:suicide",
    "garbage=tests.agents:garbage", "otherjob=tests.agents:other_job", "bigresult=tests.agents:big_result",
    "identity=tests.agents:identity", "readpath=tests.agents:read_path", "writepath=tests.agents:write_path",
    "openmany=tests.agents:open_many", "hog=tests.agents:hog", "spin=tests.agents:spin",
    "tmpnet=tests.agents:tmp_and_net", "status=tests.agents:status",
    "forkbomb=tests.agents:fork_bomb",
    "syscalls=tests.agents:forbidden_syscalls", "leaseops=tests.agents:lease_ops",
    "delegator=tests.agents:delegator", "creds=tests.agents:creds", "attacks=tests.agents:attacks",
    "grandchild=tests.agents:grandchild_then",
    "fetch=tests.agents:fetch", "httpxfetch=tests.agents:httpx_fetch", "netescape=tests.agents:net_escape",
    "rawproxy=tests.agents:raw_proxy", "filldisk=tests.agents:fill_disk",
    "flood=tests.agents:flood", "watchbudget=tests.agents:watch_budget", "ownlimits=tests.agents:own_limits",
    "forgedfail=tests.agents:forged_fail", "readerthread=tests.agents:reader_thread",
]


# -- limits on recycled cgroups, CPU time of a process tree, what a reused worker's job leaves --
def _own_cgroups() -> dict[str, str]:
    """controller -> this process's cgroup path ("unified" for the v2 line)."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctls, path = line.rstrip("\n").split(":", 2)
            for ctl in ctls.split(","):
                out[ctl or "unified"] = path
    return out


def cgroup_hog(input: Any, job: JobContext) -> Any:
    """Logs its cgroups ("cgroups" with them as fields), waits `hold` s, then allocates and
    touches `mb` MiB."""
    job.log("info", "cgroups", **_own_cgroups())
    time.sleep(float(input.get("hold", 0.3)))
    blocks = [bytearray(b"x") * (1 << 20) for _ in range(int(input.get("mb", 0)))]
    return {"allocated": len(blocks), "cgroups": _own_cgroups()}


def fork_count(input: Any, job: JobContext) -> Any:
    """Logs its cgroups, waits `hold` s, then forks children (each waits for a pipe to close)
    until the kernel refuses one or `n` run; reports how many, and its own thread count."""
    job.log("info", "cgroups", **_own_cgroups())
    time.sleep(float(input.get("hold", 0.3)))
    r, w = os.pipe()
    pids: list[int] = []
    refused = None
    try:
        for _ in range(int(input.get("n", 100))):
            try:
                pid = os.fork()
            except BlockingIOError:
                refused = "EAGAIN"
                break
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            pids.append(pid)
        with open("/proc/self/status") as f:
            threads = int(next(line for line in f if line.startswith("Threads:")).split()[1])
    finally:
        os.close(w)
        os.close(r)
        for pid in pids:
            os.waitpid(pid, 0)
    return {"forked": len(pids), "refused": refused, "threads": threads}


def cpu_children(input: Any, job: JobContext) -> Any:
    """Burns `each` s of CPU in each of `n` children, one after another (each alone stays
    under a per-process CPU limit of 1 s)."""
    n, each = int(input.get("n", 10)), float(input.get("each", 0.5))
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            burn_cpu_then_exit(each)
        os.waitpid(pid, 0)
    return {"children": n, "cgroups": _own_cgroups()}


def burn_cpu_then_exit(seconds: float) -> None:
    """In a forked child: spend `seconds` of CPU time, then exit at once."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    os._exit(0)


def _steal_next_job(job: JobContext, who: str) -> None:
    """Wait for the worker's next job, then send events into it that carry its input."""
    from shared.pipe_codec import FrameDecoder

    if who == "thread":  # the worker's own queue of jobs: take the spec, look, put it back
        spec = job._ch.jobs.get()
        job._ch.jobs.put(spec)
        specs = [spec]
    else:  # the worker's pipe, inherited through fork: read what the supervisor sends next
        data = job._ch.sock.recv(1 << 20)
        specs = [f[1] for f in FrameDecoder(1 << 22).feed(data) if f and f[0] == "job"]
    for spec in specs:
        for _ in range(3):
            job._ch.send_now(["ev", spec["job_id"], "log", ["info", f"stolen by {who}: {spec.get('input')}", None]])


def leftovers(input: Any, job: JobContext) -> Any:
    """Leaves, as asked, what must not reach a reused worker's next job: a setsid()
    grandchild named `tag` and a thread, each waiting for that job to read its input and
    send events into it, a child named `tag`, a module imported for good, or one replaced
    in sys.modules. Logs "running", then waits `hold` s."""
    import importlib
    import threading

    job.log("info", "running")
    out: dict[str, Any] = {"pid": os.getpid(), "input": input}
    if input.get("grandchild"):
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.setsid()
            pid = os.fork()
            if pid == 0:
                _name_self(input["tag"])
                time.sleep(float(input.get("delay", 0.3)))
                _steal_next_job(job, "grandchild")
                time.sleep(60)
                os._exit(0)
            os.write(w, str(pid).encode())
            os._exit(0)
        os.close(w)
        out["grandchild"] = int(os.read(r, 32))
        os.close(r)
        os.waitpid(child, 0)  # no child of the worker is left: only the grandchild, elsewhere
    if input.get("child"):  # a plain child, still running when the job ends
        if os.fork() == 0:
            _name_self(input["tag"])
            time.sleep(60)
            os._exit(0)
    if input.get("thread"):
        threading.Thread(target=_steal_next_job, args=(job, "thread"), daemon=True).start()
    if input.get("module"):
        importlib.import_module(input["module"])
    if input.get("replace"):  # a module swapped for another object under its name
        sys.modules[input["replace"]] = importlib.import_module("types").ModuleType(input["replace"])
    time.sleep(float(input.get("hold", 0)))
    return out


REGISTRY += [
    "cgrouphog=tests.agents:cgroup_hog", "forkcount=tests.agents:fork_count",
    "cpuchildren=tests.agents:cpu_children", "leftovers=tests.agents:leftovers",
]


def lease_probe(input: Any, job: JobContext) -> Any:
    """Makes the symlinks it is told to ({name: target}), then asks validate_lease_op about each
    [capability, target]: [code or "allowed", message] each. `{tmp}` stands for its temp dir."""
    tmp = os.environ.get("TMPDIR", "/tmp")
    for name, dest in (input.get("links") or {}).items():
        os.symlink(dest.replace("{tmp}", tmp), name.replace("{tmp}", tmp))
    out = []
    for cap, target in input["ops"]:
        try:
            job.validate_lease_op(cap, target.replace("{tmp}", tmp))
            out.append(["allowed", ""])
        except Exception as e:
            out.append([getattr(e, "code", type(e).__name__), str(getattr(e, "message", e))])
    return {"tmp": tmp, "results": out}


async def lease_spam(input: Any, job: JobContext) -> Any:
    """`rounds` of validate_lease_op calls, many in flight at once: a 600 KB path, paths through
    a chain of links in its temp dir, /proc magic links. Counts the answers by code."""
    tmp = os.environ.get("TMPDIR", "/tmp")
    for i in range(45):
        os.symlink(f"c{i + 1}", f"{tmp}/c{i}")
    huge = "/" + "a/" * 300000
    chain = f"{tmp}/c0/x"
    counts: dict[str, int] = {}

    async def one(cap: str, target: str) -> None:
        try:
            await job.avalidate_lease_op(cap, target)
            code = "allowed"
        except Exception as e:
            code = getattr(e, "code", type(e).__name__)
        counts[code] = counts.get(code, 0) + 1

    job.status("spamming")
    for _ in range(int(input.get("rounds", 20))):
        await asyncio.gather(one("fs.read", huge), one("net.fetch", "https://x/" + "**/" * 3000),
                             *[one("fs.read", chain) for _ in range(30)],
                             *[one("fs.read", f"/proc/1/fd/{n}") for n in range(5)],
                             one("fs.read", f"{tmp}/plain"))
    return counts


REGISTRY += ["leaseprobe=tests.agents:lease_probe", "leasespam=tests.agents:lease_spam"]


async def span(input: Any, job: JobContext) -> Any:
    """Sleeps `seconds`; returns when it started and ended (wall clock): which jobs overlapped."""
    start = time.time()
    await asyncio.sleep(float(input.get("seconds", 0.5)))
    return {"start": start, "end": time.time()}


REGISTRY += ["span=tests.agents:span"]


def import_from(input: Any, job: JobContext) -> Any:
    """Puts `dir` on sys.path and imports `module` from it (its own lease may not cover `dir`:
    the import error then says so); returns the module's VALUE. sys.path is left as found."""
    import importlib

    sys.path.append(input["dir"])
    try:
        module = importlib.import_module(input["module"])
    finally:
        sys.path.remove(input["dir"])
    return {"value": getattr(module, "VALUE", None)}


REGISTRY += ["importfrom=tests.agents:import_from"]


def reader_thread(input: Any, job: JobContext) -> Any:
    """The attack: get the worker's pipe-reader thread (started before the sandbox) to run the
    agent's code, by replacing the method it calls for each frame from the supervisor, then
    try there what the sandbox refuses: read a file outside the lease, make an AF_UNIX socket."""
    import socket
    import threading

    import worker.rpc_client as rc

    seen: dict[str, Any] = {}
    original = rc.Channel._dispatch

    def tries() -> dict[str, str]:
        out = {"thread": threading.current_thread().name}
        try:
            with open(input["path"]) as f:
                out["read"] = "read: " + f.read(32)
        except OSError as e:
            out["read"] = type(e).__name__
        try:
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
            out["unix"] = "created"
        except OSError as e:
            out["unix"] = type(e).__name__
        return out

    def dispatch(self: Any, frame: Any) -> Any:
        if "reader" not in seen:
            seen["reader"] = tries()
        return original(self, frame)

    rc.Channel._dispatch = dispatch  # type: ignore[method-assign]
    try:
        job.budget()  # a call: its reply comes through the reader thread
    finally:
        rc.Channel._dispatch = original  # type: ignore[method-assign]
    return {"main": tries(), "reader": seen.get("reader")}
