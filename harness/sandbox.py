"""Run generated Python code (HumanEval / MBPP samples) in a limited child process.

The ``humaneval_edit`` and ``mbpp_edit`` tasks score a sample by running it together with its
unit tests; lm-eval runs those tasks only with ``--confirm_run_unsafe_code``. Every program runs
through :func:`run_python`, which stacks these layers:

1. A fresh interpreter, ``python -I`` (no PYTHON* variables, no user site, no script directory
   on ``sys.path``), started in a fresh scratch directory that is also its ``HOME`` and
   ``TMPDIR``, with a minimal environment, stdin from ``/dev/null`` and its own session.
2. Kernel limits set with ``setrlimit`` before the sample runs: address space (``RLIMIT_AS``),
   CPU seconds (``RLIMIT_CPU``), size of any file written (``RLIMIT_FSIZE``, stdout and stderr
   included), open files, no core dumps, and processes (``RLIMIT_NPROC``, set to the user's
   current count plus a small budget, because the kernel counts every process of the user).
   Soft and hard limits are equal, so an unprivileged sample cannot raise them.
3. A wall-clock limit kept by the parent: on expiry the child's whole process group is killed.
4. Where ``unshare`` works (root, or unprivileged user namespaces), a new network namespace: the
   sample sees no network interface at all.
5. A Python-level guard installed in the child just before the sample runs, in the spirit of
   OpenAI human-eval's ``reliability_guard``: creating sockets and resolving names raise;
   fork, exec, spawn, ``subprocess``, ``os.system``, ``os.kill`` raise; deleting, renaming,
   chmod/chown, creating directories and opening files for writing raise for paths outside the
   scratch directory; ``ctypes`` cannot be imported; ``resource.setrlimit`` and ``os._exit``
   are disabled.  A sample passes only if it runs to its end: ``exit()`` or ``sys.exit(0)``
   before the tests ran counts as a failure.

What this does NOT give you. The guard is ordinary Python: code that sets out to defeat it can
(reload a C module to get the original functions back, load ``_ctypes`` from its file, open
files through ``_io.FileIO``, ...). It stops accidents and careless code, like human-eval's
guard, and is not a security boundary. The kernel limits are real but partial: ``RLIMIT_NPROC``
is not enforced for root, ``RLIMIT_AS`` is not enforced on macOS, and without ``unshare`` the
network is blocked only by the guard. Reading files is not restricted: a sample can read
whatever the user running the evaluation can. For code you have reason to distrust, run the
whole evaluation in a container or VM without credentials.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

OUTPUT_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    wall_time_s: float = 10.0
    cpu_time_s: float = 10.0
    memory_bytes: int = 2 * 1024**3
    max_file_bytes: int = 16 * 1024**2
    max_open_files: int = 256
    # processes the sample may add to the user's current count (the guard forbids fork anyway)
    max_new_processes: int = 8
    # try a network namespace with ``unshare`` (the guard blocks sockets either way)
    isolate_network: bool = True


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "killed"
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(source: str, limits: SandboxLimits = DEFAULT_LIMITS) -> SandboxResult:
    """Run ``source`` as a script in the sandbox; ``passed`` iff it ran to its end.

    Status: ``"passed"`` (exit 0), ``"failed"`` (an exception, a failed assert, an early
    exit), ``"timeout"`` (the wall-clock limit ran out; the process group was killed) or
    ``"killed"`` (ended by a signal, e.g. the CPU limit).
    """
    if sys.platform == "win32":
        raise OSError("harness.sandbox needs a POSIX system (resource limits, sessions)")
    base = Path(tempfile.mkdtemp(prefix="seqedit-sandbox-"))
    try:
        scratch = base / "scratch"
        scratch.mkdir()
        program = base / "program.py"
        program.write_text(source, encoding="utf-8")
        out_path, err_path = base / "stdout", base / "stderr"
        child_args = [
            str(scratch),
            str(program),
            repr(limits.memory_bytes),
            repr(math.ceil(limits.cpu_time_s)),
            repr(limits.max_file_bytes),
            repr(limits.max_open_files),
            repr(_process_budget(limits.max_new_processes)),
        ]
        cmd = [
            *(_network_namespace_prefix() if limits.isolate_network else ()),
            sys.executable, "-I", os.path.abspath(__file__), *child_args,
        ]
        env = {"PATH": os.defpath, "HOME": str(scratch), "TMPDIR": str(scratch),
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                cmd, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_time_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            # also reaps anything the sample left running in its group
            _kill_group(proc.pid)
            returncode = proc.wait()
            duration = time.monotonic() - start
        if timed_out:
            status = "timeout"
        elif returncode == 0:
            status = "passed"
        elif returncode < 0:
            status = "killed"
        else:
            status = "failed"
        return SandboxResult(
            status=status,
            returncode=None if timed_out else returncode,
            stdout=_tail(out_path),
            stderr=_tail(err_path),
            duration_s=duration,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - OUTPUT_TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def _network_namespace_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give the child an empty network namespace, or () if none work."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "--net"), (unshare, "--map-root-user", "--net")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _process_budget(extra: int) -> int | None:
    """RLIMIT_NPROC value allowing ``extra`` more processes than the user runs now (Linux)."""
    uid = os.getuid()
    if uid == 0:
        return None  # not enforced for root; the guard is what stops fork there
    tasks = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # process ended meanwhile
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            tasks += int(fields.get("Threads", "1"))
    return tasks + extra


# --------------------------------------------------------------------------- child side


def _set_limits(memory: int, cpu: int, file_size: int, open_files: int, nproc: int | None):
    import resource

    wanted = [
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, file_size),
        (resource.RLIMIT_NOFILE, open_files),
        (resource.RLIMIT_CORE, 0),
    ]
    if nproc is not None:
        wanted.append((resource.RLIMIT_NPROC, nproc))
    for which, value in wanted:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS
            pass


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is disabled")

    refused.__name__ = f"sandbox_refuses_{what.replace(' ', '_')}"
    return refused


def install_guard(scratch: str) -> None:
    """Disable network, process creation and writes outside ``scratch`` in this interpreter.

    Meant for the sandbox child only: it is irreversible for the running process.
    """
    import _io
    import _socket
    import builtins
    import io
    import posix
    import socket

    root = os.path.realpath(scratch)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):  # a file descriptor: the kernel limits what it can do
            return True
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            try:
                path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            except OSError:
                return False
        real = os.path.realpath(os.path.join(os.getcwd(), path))
        return real == root or real.startswith(root + os.sep)

    def confined(name, fn, n_paths=1):
        def guarded(*args, **kwargs):
            dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))
            for path in args[:n_paths]:
                if not inside(path, dir_fd):
                    raise PermissionError(f"sandbox: {name}({path!r}) outside the scratch directory")
            return fn(*args, **kwargs)

        guarded.__name__ = name
        return guarded

    # -- files: deleting, renaming, permission changes and writes stay inside scratch
    for name, n_paths in [
        ("remove", 1), ("unlink", 1), ("rmdir", 1), ("rename", 2), ("replace", 2),
        ("truncate", 1), ("chmod", 1), ("lchmod", 1), ("chown", 1), ("lchown", 1),
        ("chflags", 1), ("lchflags", 1), ("link", 2), ("symlink", 2), ("mkdir", 1),
        ("mkfifo", 1), ("mknod", 1), ("utime", 1), ("removexattr", 1), ("setxattr", 1),
    ]:
        for module in (os, posix):
            original = getattr(module, name, None)
            if original is not None:
                setattr(module, name, confined(name, original, n_paths))
    shutil.rmtree = confined("shutil.rmtree", shutil.rmtree)
    shutil.move = confined("shutil.move", shutil.move, 2)
    shutil.chown = confined("shutil.chown", shutil.chown)

    real_os_open = os.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path, kwargs.get("dir_fd")):
            raise PermissionError(f"sandbox: writing {path!r} outside the scratch directory")
        return real_os_open(path, flags, *args, **kwargs)

    os.open = posix.open = guarded_os_open

    real_open = io.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing {file!r} outside the scratch directory")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    sys.dont_write_bytecode = True

    # -- processes
    for name in [
        "fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "setpgid",
        "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle", "execlp",
        "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp",
        "spawnlpe", "spawnvp", "spawnvpe", "_exit",
    ]:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"os.{name}"))

    class NoPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: subprocess is disabled")

    subprocess.Popen = NoPopen
    posixsubprocess = sys.modules.get("_posixsubprocess")
    if posixsubprocess is not None:
        posixsubprocess.fork_exec = _refuse("_posixsubprocess.fork_exec")

    # -- network: the socket classes stay subclassable (ssl subclasses socket.socket)
    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network access is disabled")

    class NoRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network access is disabled")

    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoRawSocket
    for name in [
        "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
        "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo",
    ]:
        for module in (socket, _socket):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"socket.{name}"))

    # -- escape hatches into C and out of the limits
    blocked = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"}

    class BlockedImports:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ImportError(f"sandbox: importing {name} is disabled")
            return None

    for name in blocked:
        sys.modules.pop(name, None)  # modules already loaded keep working, the name does not
    sys.meta_path.insert(0, BlockedImports)
    import resource

    resource.setrlimit = _refuse("resource.setrlimit")
    if hasattr(resource, "prlimit"):
        resource.prlimit = _refuse("resource.prlimit")


def _child_main(argv: list[str]) -> int:
    scratch, program, memory, cpu, file_size, open_files, nproc = argv
    import ast
    import traceback

    _set_limits(int(memory), int(cpu), int(file_size), int(open_files), ast.literal_eval(nproc))
    with open(program, encoding="utf-8") as f:
        source = f.read()
    os.chdir(scratch)
    sys.path.insert(0, scratch)
    install_guard(scratch)
    namespace = {"__name__": "__main__", "__file__": program}
    try:
        exec(compile(source, program, "exec"), namespace)
    except SystemExit as exc:
        print(f"sandbox: the program exited early (exit code {exc.code!r})", file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
