"""Escape attempts against the code sandbox, run from a separate evaluator process that holds a
secret in its environment: each attempt must be blocked by the kernel (the Python-level guard is
bypassed on purpose: ctypes is re-imported), and the evaluator must survive all of them.

Before Landlock and the PID namespace, the pidfd attack killed the evaluator (rc 137), its
environment was readable through /proc, and io.FileIO / sqlite3 wrote outside the scratch dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from harness import sandbox

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel layers are Linux's")

SECRET = "seqedit-test-secret-4f1c"

# re-import ctypes past the guard: what is left to stop the attack is the kernel
BYPASS = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") != "BlockedImports"]
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
"""

ATTACKS = {
    "pidfd_send_signal to the parent": "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
    "pidfd_send_signal to the evaluator": "signal.pidfd_send_signal(os.pidfd_open(EVALUATOR), signal.SIGKILL)",
    "kill through libc": "assert libc.kill(EVALUATOR, signal.SIGKILL) == 0, os.strerror(ctypes.get_errno())",
    "the parent's environment": "data = open(f'/proc/{os.getppid()}/environ', 'rb').read(); assert SECRET.encode() in data",
    "the evaluator's environment": "data = open(f'/proc/{EVALUATOR}/environ', 'rb').read(); assert SECRET.encode() in data",
    "the evaluator's memory": "open(f'/proc/{EVALUATOR}/mem', 'rb')",
    "process_vm_readv": """
class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(64)
local, remote = IOVec(ctypes.addressof(buf), 64), IOVec(0x400000, 64)
assert libc.process_vm_readv(EVALUATOR, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) > 0, os.strerror(ctypes.get_errno())
""",
    "ptrace attach": "assert libc.ptrace(16, EVALUATOR, 0, 0) == 0, os.strerror(ctypes.get_errno())",
    "open for writing": "open(OUTSIDE + '/open.txt', 'w').write('x')",
    "append to an existing file": "open(CANARY, 'a').write('x')",
    "os.open": "os.close(os.open(OUTSIDE + '/os_open.txt', os.O_CREAT | os.O_WRONLY))",
    "io.FileIO": "import io; io.FileIO(OUTSIDE + '/fileio.txt', 'w').write(b'x')",
    "_io.FileIO": "import _io; _io.FileIO(OUTSIDE + '/underscore_fileio.txt', 'w').write(b'x')",
    "sqlite3": "import sqlite3; c = sqlite3.connect(OUTSIDE + '/db.sqlite'); c.execute('create table t(x)'); c.commit()",
    "shutil.copy": "import shutil; open('here.txt', 'w').write('x'); shutil.copy('here.txt', OUTSIDE + '/copied.txt')",
    "libc creat": "assert libc.creat((OUTSIDE + '/creat.txt').encode(), 0o644) >= 0, os.strerror(ctypes.get_errno())",
    "subprocess": "import subprocess; subprocess.run(['touch', OUTSIDE + '/subprocess.txt'], check=True)",
    "a symlink out of scratch": """
assert libc.symlink(OUTSIDE.encode(), b'out') == 0, os.strerror(ctypes.get_errno())
import _io; _io.FileIO('out/through_symlink.txt', 'w').write(b'x')
""",
    "rename the canary": "assert libc.rename(CANARY.encode(), (OUTSIDE + '/renamed.txt').encode()) == 0, os.strerror(ctypes.get_errno())",
    "unlink the canary": "assert libc.unlink(CANARY.encode()) == 0, os.strerror(ctypes.get_errno())",
}

EVALUATOR = """
import json, os, sys
from harness.sandbox import SandboxLimits, run_python
attacks = json.loads(sys.argv[1])
results = {}
for name, source in attacks.items():
    result = run_python(source, SandboxLimits(wall_time_s=10.0))
    results[name] = [result.status, result.stdout, result.stderr[-600:]]
    print(json.dumps({name: results[name]}), flush=True)
print("EVALUATOR SURVIVED", flush=True)
"""


def program(attack: str, outside, canary) -> str:
    header = (f"EVALUATOR = {os.getpid()}\nSECRET = {SECRET!r}\nOUTSIDE = {str(outside)!r}\n"
              f"CANARY = {str(canary)!r}\n")
    body = textwrap.indent(textwrap.dedent(attack).strip(), "    ")
    return header + BYPASS + f"try:\n{body}\n    print('ESCAPED')\nexcept BaseException as exc:\n    print('blocked:', repr(exc))\n"


def test_every_escape_attempt_is_blocked_and_the_evaluator_survives(tmp_path):
    protection = sandbox.kernel_protection()
    if protection.missing:
        with pytest.raises(sandbox.SandboxUnavailable, match="refuses to run generated code"):
            sandbox.run_python("print(1)", sandbox.SandboxLimits())
        warnings.warn("this machine lacks " + "; ".join(protection.missing) + ": the sandbox refuses to run "
                      "code here (checked), so the escape attempts were not run", stacklevel=1)
        return
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary.txt"
    canary.write_text("untouched")
    env = {**os.environ, "SEQEDIT_TEST_SECRET": SECRET}
    env.pop(sandbox.UNPROTECTED_ENV, None)
    # the evaluator learns its own pid only once started: the programs read it from EVALUATOR,
    # filled in by a tiny wrapper that substitutes os.getpid() before running the attacks
    wrapper = ("import json, os, sys\nattacks = {k: v.replace('EVALUATOR = 0', f'EVALUATOR = {os.getpid()}') "
               "for k, v in json.loads(sys.argv[1]).items()}\nsys.argv[1] = json.dumps(attacks)\n" + EVALUATOR)
    programs = {name: program(src, outside, canary).replace(f"EVALUATOR = {os.getpid()}", "EVALUATOR = 0")
                for name, src in ATTACKS.items()}
    proc = subprocess.run([sys.executable, "-c", wrapper, json.dumps(programs)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"the evaluator died (rc {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    assert proc.stdout.rstrip().endswith("EVALUATOR SURVIVED")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            results.update(json.loads(line))
    assert set(results) == set(ATTACKS)
    escaped = {name: r for name, r in results.items() if "ESCAPED" in r[1] or "blocked:" not in r[1]}
    assert not escaped, escaped
    assert SECRET not in proc.stdout
    assert sorted(p.name for p in outside.iterdir()) == ["canary.txt"]
    assert canary.read_text() == "untouched"


def test_without_the_kernel_features_the_sandbox_refuses_unless_opted_in(monkeypatch):
    bare = sandbox.KernelProtection(landlock_abi=0, namespace_prefix=(), isolated=frozenset())
    monkeypatch.setattr(sandbox, "kernel_protection", lambda: bare)
    monkeypatch.delenv(sandbox.UNPROTECTED_ENV, raising=False)
    with pytest.raises(sandbox.SandboxUnavailable) as info:
        sandbox.run_python("print(1)")
    assert "Landlock" in str(info.value) and "PID namespace" in str(info.value)
    assert sandbox.UNPROTECTED_ENV in str(info.value)
    assert sandbox.run_python("print(1)", sandbox.SandboxLimits(allow_unprotected=True)).stdout == "1\n"
    monkeypatch.setenv(sandbox.UNPROTECTED_ENV, "1")
    assert sandbox.run_python("print(2)").passed


def test_the_program_cannot_see_any_process_outside_its_namespace():
    if sandbox.kernel_protection().missing:
        with pytest.raises(sandbox.SandboxUnavailable):
            sandbox.run_python("print(1)", sandbox.SandboxLimits())
        return
    result = sandbox.run_python("import os\nprint(os.getppid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert result.passed, result.stderr
    assert result.stdout.strip() == "1 [1, 2]"
