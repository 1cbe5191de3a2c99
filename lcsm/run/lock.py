"""Locks: one process at a time in a run directory or an ablation directory.

    FOLDER/.lcsm.lock    {"pid", "host", "started" (unix time), "command", "start_ticks" (Linux)}

The lock file is created with O_CREAT | O_EXCL, so of two processes exactly one gets it; the other
is told who holds it (pid, host, command, since when) and exits with code 2. A lock whose process
is gone — same host, and no process with that pid (or, on Linux, one started at another time: the
pid was reused) — is stale: it is taken over, with a message. A lock held on another host is never
taken over (its pid means nothing here); the message says so and how to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lcsm.config.base import RecipeError
from lcsm.run.files import LOCK


class LockError(RecipeError):
    """The folder is in use by another process; str() names the holder."""


def _start_ticks(pid: int) -> int | None:
    """The start time of process pid in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    except OSError:
        return True
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


def _command() -> str:
    """This process's command line as the user typed it ('lcsm train r.yaml', 'pytest ...')."""
    if not sys.argv or not sys.argv[0]:
        return ""
    first = Path(sys.argv[0])
    name = "lcsm" if first.name == "lcsm" or first.parts[-3:] == ("lcsm", "cli", "__main__.py") else first.name
    return " ".join([name, *sys.argv[1:]])[:300]


def _describe(info: dict) -> str:
    since = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    command = f" ({info['command']})" if info.get("command") else ""
    return f"process {info.get('pid', '?')} on {info.get('host', '?')}{command}{when}"


@dataclass
class Lock:
    """A held lock; release() removes the file if it is still ours (safe to call twice)."""

    path: Path
    pid: int
    token: str

    def release(self) -> None:
        if self.pid != os.getpid():
            return  # a copy of the lock in another process (torchrun ranks get rank 0's): not theirs
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(folder: Path, what: str = "run directory", log: Callable[[str], None] | None = None) -> Lock:
    """Take FOLDER/.lcsm.lock (the folder must exist). Raises LockError naming the holder when
    another live process has it; takes over a stale lock (its process is gone), saying so."""
    path = Path(folder) / LOCK
    pid = os.getpid()
    token = f"{socket.gethostname()}:{pid}:{time.time_ns()}"
    info = {"pid": pid, "host": socket.gethostname(), "started": round(time.time(), 3),
            "command": _command(),
            "start_ticks": _start_ticks(pid), "token": token}
    for _ in range(20):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                # being written this instant by its taker, or cut short by a crash: look again
                time.sleep(0.05)
                holder = _read(path)
                if holder is None and _age(path) < 5:
                    continue
            if holder is not None and not _stale(holder):
                where = "" if holder.get("host") == socket.gethostname() else (
                    f"; it is on another host, so lcsm cannot tell whether it still runs: if it does not, remove {path}")
                raise LockError(f"{folder}: this {what} is in use by {_describe(holder)}; wait for it to finish or stop it, "
                                f"or use another directory{where}") from None
            if _break(path, holder):
                if log is not None:
                    was = _describe(holder) if holder else "an unreadable lock file"
                    log(f"{folder}: took over a stale lock ({was} is no longer running)")
            continue
        except FileNotFoundError:
            raise RecipeError(f"{folder}: no such folder") from None
        except OSError as e:
            raise RecipeError(f"{folder}: cannot create the lock file {LOCK} ({e.strerror})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return Lock(path, pid, token)
    raise LockError(f"{folder}: could not take the lock {path} (other processes keep taking it)")


def holder(folder: Path) -> dict | None:
    """Who holds FOLDER's lock now (a live process), or None."""
    info = _read(Path(folder) / LOCK)
    return info if info is not None and not _stale(info) else None


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _stale(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return False  # a pid on another machine cannot be checked from here
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return True
    return not _alive(pid, info.get("start_ticks"))


def _break(path: Path, seen: dict | None) -> bool:
    """Remove the stale lock `seen`, unless someone else replaced it meanwhile. The removal is
    itself guarded by an O_EXCL file, so two processes that both found the lock stale cannot
    remove the fresh lock the first of them took."""
    guard = path.with_name(path.name + ".break")
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if _age(guard) > 10:  # its owner died between creating and removing it
            guard.unlink(missing_ok=True)
        time.sleep(0.05)
        return False
    os.close(fd)
    try:
        if _read(path) == seen:
            path.unlink(missing_ok=True)
            return True
        return False
    finally:
        guard.unlink(missing_ok=True)
