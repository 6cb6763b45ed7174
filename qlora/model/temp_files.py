"""Temp files and directories beside a target, named after the process that made them, so the
next writer of the same target removes what a killed process (SIGKILL, OOM killer) left behind.

    tmp = temp_beside(Path("out.gguf"))                  # .out.gguf.tmp-HOST-PID-XXXXXXXX
    ...write tmp, fsync...; os.replace(tmp, "out.gguf")  # the target is never half-written

Only temps of this host whose process is gone are removed: a live writer's, or another
machine's on a shared filesystem, are left alone. A previous output moved aside (`.old`) by a
process killed before it renamed the new one in is put back where the target is missing.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from pathlib import Path


def _prefix(target: Path, pid: int | None = None) -> str:
    return f".{target.name}.tmp-{socket.gethostname()}-" + ("" if pid is None else f"{pid}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove the temps of `target` that dead processes of this host left (a `.old` one goes
    back to `target` if that is missing); the paths dealt with."""
    prefix, removed = _prefix(target), []
    for p in target.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if p.name.endswith(".old") and not target.exists():  # killed between its two renames
            os.replace(p, target)  # the previous output comes back
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def temp_beside(target: Path, directory: bool = False, suffix: str = "") -> Path:
    """A new empty temp file (or directory) in `target`'s directory, after removing stale ones."""
    remove_stale(target)
    prefix = _prefix(target, os.getpid())
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(name)
