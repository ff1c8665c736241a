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
4. Kernel containment, required (see :func:`kernel_protection`): the program runs in fresh PID,
   mount and network namespaces (``unshare``; as root, or with unprivileged user namespaces)
   with its own ``/proc``, so no process outside (the evaluator among them) can be seen,
   signalled (``kill``, ``pidfd_send_signal``), traced or read (``/proc/<pid>/environ``,
   ``/mem``, ``process_vm_readv``), and there is no network interface; and under Landlock,
   which makes everything outside the scratch directory (and ``/dev/null``) impossible to
   create, write, truncate, rename or remove, whatever route the code takes (``_io.FileIO``,
   sqlite3, ctypes, symlinks, child processes), and from Landlock ABI 6 also blocks signals to
   processes outside the sandbox. Where the kernel lacks either, :func:`run_python` raises
   :class:`SandboxUnavailable` instead of running code unprotected, unless the caller opts in
   (``SandboxLimits(allow_unprotected=True)`` or ``SEQEDIT_SANDBOX_UNPROTECTED=1``).
5. A Python-level guard installed in the child just before the sample runs, in the spirit of
   OpenAI human-eval's ``reliability_guard``: creating sockets and resolving names raise;
   fork, exec, spawn, ``subprocess``, ``os.system``, ``os.kill`` raise; deleting, renaming,
   chmod/chown, creating directories and opening files for writing raise for paths outside the
   scratch directory; ``ctypes`` cannot be imported; ``resource.setrlimit`` and ``os._exit``
   are disabled.  A sample passes only if it runs to its end: ``exit()`` or ``sys.exit(0)``
   before the tests ran counts as a failure.

What this does NOT give you. The guard is ordinary Python that code can defeat; layer 4 is what
contains code that sets out to escape (tests/test_sandbox_escapes.py runs such attempts with the
guard bypassed). Reading is not restricted: a sample can read whatever files the user running
the evaluation can (the evaluator's own environment and memory excepted). ``RLIMIT_NPROC`` is
not enforced for root and ``RLIMIT_AS`` not on macOS. For code you have reason to distrust
beyond that, run the whole evaluation in a container or VM without credentials.
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

try:
    from harness.errors import UserError
except ImportError:  # this file also runs as the child's script, where only the stdlib is needed
    UserError = Exception

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
    # run even where the kernel cannot contain the program (see kernel_protection); also
    # SEQEDIT_SANDBOX_UNPROTECTED=1
    allow_unprotected: bool = False


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


class SandboxUnavailable(UserError, OSError):
    """The kernel lacks what contains generated code; the sandbox refuses to run it."""


UNPROTECTED_ENV = "SEQEDIT_SANDBOX_UNPROTECTED"
# Landlock: the access rights that change the filesystem, by the ABI version that introduced them
LANDLOCK_WRITE_RIGHTS = {
    1: (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12),
    2: 1 << 13,  # REFER: linking or renaming a file into another directory
    3: 1 << 14,  # TRUNCATE
}
LANDLOCK_WRITE_FILE, LANDLOCK_TRUNCATE = 1 << 1, 1 << 14
LANDLOCK_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect (ABI 4)
LANDLOCK_SCOPES = (1 << 0) | (1 << 1)  # abstract unix sockets, signals (ABI 6)
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class KernelProtection:
    """What this kernel offers to contain a program: Landlock (writes outside the scratch
    directory, and from ABI 6 signals to outside processes) and namespaces made with ``unshare``
    (a PID namespace with its own /proc: no process outside it can be seen, signalled, traced or
    read; a network namespace without interfaces)."""

    landlock_abi: int
    namespace_prefix: tuple[str, ...]
    isolated: frozenset  # of "pid", "net"

    @property
    def missing(self) -> list[str]:
        out = []
        if self.landlock_abi < 1:
            out.append("Landlock (Linux >= 5.13 with landlock in the LSM list), which confines writes "
                       "to the scratch directory")
        if "pid" not in self.isolated:
            out.append("a PID namespace with its own /proc (unshare --pid --fork --mount-proc, as root or "
                       "with unprivileged user namespaces), which hides the evaluator's process, its "
                       "environment and its memory")
        return out


def _landlock_abi() -> int:
    if not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return max(int(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)), 0)  # ..._VERSION
    except (OSError, AttributeError):
        return 0


@lru_cache(maxsize=1)
def kernel_protection() -> KernelProtection:
    abi = _landlock_abi()
    unshare = shutil.which("unshare")
    candidates = [
        ((unshare, "--net", "--pid", "--fork", "--mount-proc"), {"net", "pid"}),
        ((unshare, "--map-root-user", "--net", "--pid", "--fork", "--mount-proc"), {"net", "pid"}),
        ((unshare, "--net"), {"net"}),
        ((unshare, "--map-root-user", "--net"), {"net"}),
    ] if unshare else []
    for prefix, isolated in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return KernelProtection(abi, prefix, frozenset(isolated))
    return KernelProtection(abi, (), frozenset())


def run_python(source: str, limits: SandboxLimits = DEFAULT_LIMITS) -> SandboxResult:
    """Run ``source`` as a script in the sandbox; ``passed`` iff it ran to its end.

    Status: ``"passed"`` (exit 0), ``"failed"`` (an exception, a failed assert, an early
    exit), ``"timeout"`` (the wall-clock limit ran out; the process group was killed) or
    ``"killed"`` (ended by a signal, e.g. the CPU limit).
    """
    if sys.platform == "win32":
        raise OSError("harness.sandbox needs a POSIX system (resource limits, sessions)")
    protection = kernel_protection()
    opted_in = limits.allow_unprotected or os.environ.get(UNPROTECTED_ENV, "") not in ("", "0")
    if protection.missing and not opted_in:
        raise SandboxUnavailable(
            "the sandbox refuses to run generated code: this machine lacks " + "; and ".join(protection.missing)
            + f". Run the code tasks on a Linux machine that has them, or set {UNPROTECTED_ENV}=1 to run the "
            "code with the remaining layers only (resource limits and a Python-level guard that code can defeat)")
    base = Path(tempfile.mkdtemp(prefix="seqedit-sandbox-"))
    try:
        scratch = base / "scratch"
        scratch.mkdir()
        program = base / "program.py"
        program.write_text(source, encoding="utf-8")
        out_path, err_path, status_path = base / "stdout", base / "stderr", base / "status"
        child_args = [
            str(scratch),
            str(program),
            str(status_path),
            repr(protection.landlock_abi),
            repr(limits.memory_bytes),
            repr(math.ceil(limits.cpu_time_s)),
            repr(limits.max_file_bytes),
            repr(limits.max_open_files),
            repr(_process_budget(limits.max_new_processes)),
        ]
        cmd = [
            *(protection.namespace_prefix if limits.isolate_network or "pid" in protection.isolated else ()),
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
        if status_path.exists():  # the program ran under an init process, which reported its end
            try:
                returncode = int(status_path.read_text())
            except ValueError:
                pass
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


def restrict_filesystem(scratch: str, abi: int) -> None:
    """Landlock, irreversibly for this process and its children: nothing outside ``scratch`` (and
    /dev/null) can be created, written, truncated, renamed or removed, whatever route the code
    takes (``_io.FileIO``, sqlite3, ctypes, a symlink); from ABI 4 no TCP, from ABI 6 no signal
    to a process outside the sandbox. Reading is left alone."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    handled = 0
    for version, rights in LANDLOCK_WRITE_RIGHTS.items():
        if abi >= version:
            handled |= rights
    fields = [handled]
    if abi >= 4:
        fields.append(LANDLOCK_NET_TCP)
    if abi >= 6:
        fields.append(LANDLOCK_SCOPES)
    attr = ctypes.create_string_buffer(struct.pack(f"={len(fields)}Q", *fields))
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attr, len(attr.raw), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        for path, rights in ((scratch, handled), ("/dev/null", handled & (LANDLOCK_WRITE_FILE | LANDLOCK_TRUNCATE))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd))
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0) < 0:  # PATH_BENEATH
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}) failed")
            finally:
                os.close(fd)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)


def _run_under_init(status_path: str) -> None:
    """In a fresh PID namespace this process is its init, which the kernel shields from signals it
    has no handler for (the CPU limit's among them). So it forks: the program runs as process 2,
    and this one waits and writes how it ended (``-signal`` or the exit code) for the parent."""
    child = os.fork()
    if child == 0:
        return
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            status = 0
            break
        except InterruptedError:
            continue
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)
    with open(status_path, "w") as fh:
        fh.write(str(code))
    os._exit(0)


def _child_main(argv: list[str]) -> int:
    scratch, program, status_path, landlock_abi, memory, cpu, file_size, open_files, nproc = argv
    import ast
    import traceback

    if os.getpid() == 1:
        _run_under_init(status_path)
    _set_limits(int(memory), int(cpu), int(file_size), int(open_files), ast.literal_eval(nproc))
    if int(landlock_abi) >= 1:
        restrict_filesystem(scratch, int(landlock_abi))
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
