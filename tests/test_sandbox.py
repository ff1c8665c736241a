"""harness.sandbox: generated code runs to completion or is stopped, and stays contained."""

from __future__ import annotations

import os
import re
import sys

import pytest

from harness.sandbox import SandboxLimits, run_python

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox is POSIX-only")

QUICK = SandboxLimits(wall_time_s=2.0, cpu_time_s=3.0, memory_bytes=512 * 1024**2)


def run(source: str, limits: SandboxLimits = QUICK):
    return run_python(source, limits)


def test_a_correct_program_passes_and_its_output_is_kept():
    result = run("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('checked')\n")
    assert result.status == "passed" and result.passed
    assert result.returncode == 0
    assert result.stdout == "checked\n"


def test_a_failing_assert_fails_with_its_traceback():
    result = run("def add(a, b):\n    return a * b\n\nassert add(2, 3) == 5\n")
    assert result.status == "failed" and not result.passed
    assert "AssertionError" in result.stderr


def test_exiting_before_the_tests_ran_is_a_failure():
    assert run("import sys\nsys.exit(0)\nassert False\n").status == "failed"
    early = run("import os\nos._exit(0)\nassert False\n")
    assert early.status == "failed" and "os._exit is disabled" in early.stderr


def test_an_infinite_loop_is_stopped_by_the_wall_clock_limit():
    result = run("while True:\n    pass\n", SandboxLimits(wall_time_s=1.0, cpu_time_s=5.0))
    assert result.status == "timeout" and not result.passed
    # status "timeout" already says which limit fired; the bound only rules out a hang
    assert result.duration_s >= 1.0


def test_the_cpu_time_limit_kills_a_busy_program():
    result = run("x = 0\nwhile True:\n    x += 1\n", SandboxLimits(wall_time_s=8.0, cpu_time_s=1.0))
    assert result.status == "killed" and result.returncode < 0
    assert result.duration_s < 5.0


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import posix\nwhile True:\n    posix.fork()\n",
        "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'pass'])\n",
        "import os\nwhile True:\n    os.system('true &')\n",
        "import multiprocessing\n",
        "import ctypes\nctypes.CDLL(None).fork()\n",
    ],
    ids=["os.fork", "posix.fork", "subprocess", "os.system", "multiprocessing", "ctypes"],
)
def test_fork_bombs_cannot_start_a_single_process(bomb):
    result = run(bomb)
    assert result.status == "failed"
    assert re.search(r"(PermissionError|ImportError): sandbox: .* disabled", result.stderr)
    # refused at the first attempt, not stopped by the time limit
    assert result.duration_s < QUICK.wall_time_s


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "keep" / "canary.txt"
    path.parent.mkdir()
    path.write_text("still here")
    return path


@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.remove({path!r})",
        "import os\nos.unlink({path!r})",
        "import pathlib\npathlib.Path({path!r}).unlink()",
        "import shutil\nshutil.rmtree({dir!r})",
        "import os\nos.rename({path!r}, 'stolen.txt')",
        "import shutil\nshutil.move({path!r}, 'stolen.txt')",
        "open({path!r}, 'w').write('overwritten')",
        "import os\nos.truncate({path!r}, 0)",
        "import os\nos.chmod({path!r}, 0)",
        "import os\nos.chdir({dir!r})\nos.remove('canary.txt')",
    ],
    ids=["remove", "unlink", "pathlib", "rmtree", "rename", "move", "overwrite", "truncate",
         "chmod", "chdir-relative"],
)
def test_files_outside_the_scratch_directory_survive(canary, attack):
    result = run(attack.format(path=str(canary), dir=str(canary.parent)))
    assert result.status == "failed"
    assert "outside the scratch directory" in result.stderr
    assert canary.read_text() == "still here"
    assert os.stat(canary).st_mode & 0o777 != 0


def test_files_inside_the_scratch_directory_are_usable():
    program = (
        "import os, shutil, tempfile, pathlib\n"
        "os.makedirs('a/b')\n"
        "pathlib.Path('a/b/f.txt').write_text('x')\n"
        "os.rename('a/b/f.txt', 'a/g.txt')\n"
        "assert open('a/g.txt').read() == 'x'\n"
        "shutil.rmtree('a')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'y')\n"
        "assert not os.path.exists('a')\n"
    )
    result = run(program)
    assert result.passed, result.stderr


@pytest.mark.parametrize(
    "call",
    [
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        "import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))",
        "import _socket\n_socket.socket()",
        "import socket\nsocket.getaddrinfo('example.com', 80)",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
    ],
    ids=["create_connection", "socket", "_socket", "dns", "urllib"],
)
def test_network_calls_fail(call):
    result = run(call)
    assert result.status == "failed"
    assert re.search(r"sandbox: (network access|socket\.\w+) is disabled", result.stderr)


def test_a_memory_hog_is_stopped():
    result = run("hog = bytearray(4 * 1024**3)\n", SandboxLimits(memory_bytes=256 * 1024**2))
    assert not result.passed
    assert "MemoryError" in result.stderr or result.status == "killed"


def test_a_huge_file_is_stopped_by_the_file_size_limit():
    program = "with open('big', 'wb') as f:\n    f.write(b'x' * (8 * 1024**2))\n"
    result = run(program, SandboxLimits(max_file_bytes=1024**2))
    assert not result.passed
    assert "File too large" in result.stderr or result.status == "killed"


def test_the_limits_cannot_be_lifted_from_inside():
    program = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
    )
    result = run(program)
    assert result.status == "failed" and "resource.setrlimit is disabled" in result.stderr
