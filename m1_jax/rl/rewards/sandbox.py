"""Run untrusted generated Python in a separate, limited process.

Layers, each cheap, none a perfect boundary on its own:
  * a fresh `python -I -B` process (isolated mode: no env vars, no user site, no script dir on sys.path),
    stdin closed unless given, environment stripped to PATH/LANG/HOME;
  * resource limits set in the child before exec: CPU time, address space, file size (which also caps
    stdout/stderr, written to files outside the program's directory), open files, no core dumps;
  * a wall-clock timeout that SIGKILLs the whole process group;
  * a fresh network namespace (`unshare -n`, only a down loopback) when the host allows it;
  * audit hooks installed before the program runs that refuse sockets, spawning processes, loading
    native libraries with ctypes, and writes/deletes outside the program's temporary directory;
  * the temporary directory is deleted afterwards.
Audit hooks are not a security boundary against a determined attacker (they guard against accidents and
reward hacking by a small model); for hostile code add a container or gVisor around the trainer.
"""

import dataclasses
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import logging

# Runs in the child before the program: installs the audit hook, then executes the program as __main__.
# argv: [-c, program_path, root_dir].
_BOOTSTRAP = r"""
import os, sys
def _install(root):
    root = os.path.realpath(root)
    blocked = ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
               "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
               "socket.sendto", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "os.fork", "os.forkpty", "pty.spawn", "ctypes.dlopen", "ctypes.cdata", "os.kill",
               "os.killpg", "sys.addaudithook")
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2,
                   "os.symlink": 2, "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1,
                   "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, join, getcwd, isinstance_, str_, bytes_ = (
        os.path.realpath, os.path.join, os.getcwd, isinstance, str, bytes)
    def inside(path):
        if isinstance_(path, int):
            return True  # an already-open descriptor
        if isinstance_(path, bytes_):
            path = path.decode(errors="replace")
        if not isinstance_(path, str_):
            path = str_(path)
        full = realpath(join(getcwd(), path))
        return full == root or full.startswith(root + os.sep) or full == "/dev/null"
    def hook(event, args):
        if event in blocked or event.startswith("os.exec") or event.startswith("os.spawn"):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance_(mode, str_) and any(c in mode for c in "wax+")) or (
                isinstance_(flags, int) and flags & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        elif event in path_events:
            for path in tuple(args)[:path_events[event]]:
                if path is not None and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory")
    sys.addaudithook(hook)
program_path, root = sys.argv[1], sys.argv[2]
with open(program_path, encoding="utf-8") as f:
    source = f.read()
code = compile(source, "solution.py", "exec")
sys.argv = ["solution.py"]
if root != "-":
    _install(root)
del _install
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 2.0  # wall clock
    cpu_time_s: int | None = None  # defaults to ceil(timeout_s) + 1
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS
    max_output_bytes: int = 64 * 2**10  # per stream; also the largest file the program may write
    python: str = sys.executable
    network_namespace: bool = True  # use `unshare -n` when it works on this host
    require_network_namespace: bool = False  # raise instead of falling back to the audit hook alone
    audit_hooks: bool = True


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool  # exited with status 0 in time
    timed_out: bool
    killed: bool  # ended by a signal (timeout SIGKILL, SIGXCPU, SIGXFSZ, ...)
    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    network_isolated: bool  # ran in its own network namespace


@functools.lru_cache(maxsize=None)
def _unshare_prefix() -> tuple[str, ...] | None:
    """The command prefix that gives the child an empty network namespace here, or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    # As root -n alone works; unprivileged users need a user namespace (-r) to be allowed to create one.
    for prefix in ((unshare, "-n"), (unshare, "-r", "-n")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    logging.warning("`unshare -n` does not work here; sandbox network blocking relies on audit hooks only")
    return None


def _limit_resources(config: SandboxConfig):
    cpu = config.cpu_time_s if config.cpu_time_s is not None else int(config.timeout_s) + 1
    # Python-side preexec_fn: only async-signal-safe-ish calls (setrlimit) between fork and exec.

    def preexec():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (config.memory_bytes, config.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (config.max_output_bytes, config.max_output_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return preexec


def _read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(program: str, *, stdin: str | None = None, config: SandboxConfig = SandboxConfig()
               ) -> SandboxResult:
    """Runs `program` as __main__ in the sandbox and reports how it ended."""
    if config.timeout_s <= 0:
        raise ValueError(f"timeout_s={config.timeout_s} must be positive")
    prefix = _unshare_prefix() if config.network_namespace else None
    if config.require_network_namespace and prefix is None:
        raise RuntimeError("require_network_namespace=True but `unshare -n` is not available on this host; "
                           "run as root, enable user namespaces, or set require_network_namespace=False")
    outer = tempfile.mkdtemp(prefix="m1_sandbox_")
    try:
        work = os.path.join(outer, "work")  # the program's cwd; stdout/stderr live outside it
        os.mkdir(work)
        program_path = os.path.join(outer, "solution.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        stdin_path = os.path.join(outer, "stdin")
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(stdin or "")
        cmd = [*(prefix or ()), config.python, "-I", "-B", "-c", _BOOTSTRAP, program_path,
               work if config.audit_hooks else "-"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "PYTHONIOENCODING": "utf-8"}
        start = time.monotonic()
        timed_out = False
        with open(stdin_path, "rb") as fin, open(os.path.join(outer, "stdout"), "wb") as fout, \
            open(os.path.join(outer, "stderr"), "wb") as ferr:
            proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=work, env=env,
                                    preexec_fn=_limit_resources(config), start_new_session=True, close_fds=True)
            try:
                proc.wait(timeout=config.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                # Not yet reaped, so its pid (= its process group id) cannot have been reused.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        duration = time.monotonic() - start
        returncode = proc.returncode
        return SandboxResult(
            passed=returncode == 0 and not timed_out,
            timed_out=timed_out,
            killed=timed_out or returncode < 0,
            returncode=returncode,
            stdout=_read_capped(os.path.join(outer, "stdout"), config.max_output_bytes),
            stderr=_read_capped(os.path.join(outer, "stderr"), config.max_output_bytes),
            duration_s=duration,
            network_isolated=prefix is not None,
        )
    finally:
        shutil.rmtree(outer, ignore_errors=True)
