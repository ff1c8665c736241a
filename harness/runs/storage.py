"""Files a run writes so that a killed process loses nothing: atomic writes, edit states with
checksums and a previous copy, per-method locks, and the checks that tell a finished checkpoint
from a damaged one."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from harness.errors import ConfigError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)



@contextlib.contextmanager
def method_lock(method_dir: Path):
    """Held while a process edits one method, so that two processes sharing an output directory
    (``--only``) cannot both write the same method's state and trace. The lock file holds the
    holder's process id, for the message a second process gets (and for whoever must stop it)."""
    import fcntl

    method_dir.mkdir(parents=True, exist_ok=True)
    # opened without truncating: a process that fails to take the lock must not erase the holder's id;
    # closing the file releases the lock, also when the process dies
    with open(method_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            raise ConfigError(f"{method_dir.name} is being run by another process ({f'pid {holder}, ' if holder else ''}"
                              f"it holds {method_dir / '.lock'}); give each process a different --only") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield



def checkpoint_problem(path: Path, method: str, edits: int) -> str | None:
    """Why the results file of a checkpoint cannot be used (None: it can). A file is complete when
    it parses and says which method and point it belongs to; a truncated or foreign one is not."""
    if not path.exists():
        return "missing"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        return f"{path.name} is damaged ({exc.__class__.__name__})"
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        return f"{path.name} holds no lm-eval results"
    tag = data.get("seqedit") or {}
    if tag.get("method") != method or tag.get("num_edits") != edits:
        return f"{path.name} belongs to {tag.get('method')!r} at {tag.get('num_edits')!r} edits"
    return None


STATE_PREVIOUS = ".prev"
CHECKSUM_SUFFIX = ".sha256"


def save_verified_state(obj, path: Path) -> None:
    """Write the edit state atomically with a checksum beside it, keeping the previous state (and
    its checksum) as ``<name>.prev``: a damaged state falls back one save instead of to nothing."""
    from harness.loading import file_sha256

    previous = path.with_name(path.name + STATE_PREVIOUS)
    if path.exists():
        os.replace(path, previous)
        checksum = path.with_name(path.name + CHECKSUM_SUFFIX)
        if checksum.exists():
            os.replace(checksum, previous.with_name(previous.name + CHECKSUM_SUFFIX))
    atomic_torch_save(obj, path)
    atomic_write_text(path.with_name(path.name + CHECKSUM_SUFFIX), file_sha256(path) + "\n")


def load_verified_state(path: Path) -> tuple[dict | None, str]:
    """The newest edit state whose checksum matches and which loads; and what was found wrong on
    the way (empty when nothing)."""
    import torch

    from harness.loading import file_sha256

    found = []
    for candidate in (path, path.with_name(path.name + STATE_PREVIOUS)):
        if not candidate.exists():
            continue
        checksum = candidate.with_name(candidate.name + CHECKSUM_SUFFIX)
        expected = checksum.read_text().strip() if checksum.exists() else None
        if expected != file_sha256(candidate):
            found.append(f"{candidate.name} does not match its checksum" if expected else
                         f"{candidate.name} has no checksum (its save was cut short)")
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=False)
            state["lm"]["edited_case_ids"], state["rng"]  # noqa: B018 - the parts resume needs
        except Exception as exc:  # a file that cannot be read back is damaged, whatever the cause
            found.append(f"{candidate.name} cannot be read ({exc.__class__.__name__})")
            continue
        if found:
            found.append(f"resuming from {candidate.name} ({len(state['lm']['edited_case_ids'])} edits)")
        return state, "; ".join(found)
    if found:
        found.append("no usable edit state: editing again from the start")
    return None, "; ".join(found)


def remove_stale_temporaries(directory: Path, recursive: bool = True, locked: bool = False) -> list[Path]:
    """Remove the ``<file>.tmp<pid>`` copies that an atomic write killed half-way left behind.

    In a method directory whose lock this process holds (``locked``) every such file is stale;
    elsewhere only those whose writing process is gone."""
    removed = []
    if not directory.exists():
        return removed
    for tmp in (directory.rglob if recursive else directory.glob)("*.tmp*"):
        suffix = tmp.name.rpartition(".tmp")[2]
        if not suffix.isdigit() or not tmp.is_file():
            continue
        if not locked and process_alive(int(suffix)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing while it cleans
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
