"""Per-execution cgroups: one memory (RAM + swap) and process cap for a program's whole process tree.

cgroup v2 is used where the caller's own cgroup, or else its parent (new cgroups are then
siblings of the caller's), delegates ``memory`` and ``pids`` (``cgroup.subtree_control``) and is
writable; otherwise cgroup v1 where the caller's ``memory`` and ``pids`` cgroups are writable. The
sandbox bootstrap moves itself in (writes ``0`` to each ``cgroup.procs``) before any untrusted code
runs, so everything it starts is counted.
"""
from __future__ import annotations

import functools
import os
import secrets
import signal
import time


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of each cgroup mount."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            fstype, _, options = rest.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                found.append((fields.split()[4], fstype, set(options.split(","))))
    return found


def _own_cgroups() -> dict[str, str]:
    """Controller (``""`` for v2) -> the caller's cgroup path, from /proc/self/cgroup."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    return own


def _writable(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK)


@functools.cache
def _parents() -> tuple[tuple[str, ...], str] | None:
    """The cgroup directories new cgroups go under and the version ("v2" or "v1"); None if neither works."""
    own, mounts = _own_cgroups(), _mounts()
    for point, fstype, _ in mounts:
        if fstype != "cgroup2" or "" not in own:
            continue
        mine = point + own[""].rstrip("/")
        for parent in (mine, os.path.dirname(mine)):  # siblings: a v2 cgroup with processes cannot delegate
            if not parent.startswith(point) or not _writable(parent):
                continue
            try:
                with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                    delegated = set(f.read().split())
            except OSError:
                continue
            if {"memory", "pids"} <= delegated:
                return (parent,), "v2"
    v1 = []
    for controller in ("memory", "pids"):
        points = [p for p, fstype, opts in mounts if fstype == "cgroup" and controller in opts]
        if not points or controller not in own or not _writable(points[0] + own[controller].rstrip("/")):
            return None
        v1.append(points[0] + own[controller].rstrip("/"))
    return tuple(v1), "v1"


def _settings(version: str, memory_bytes: int, processes: int) -> list[tuple[str, str]]:
    """(file, value) to write, in order, per new cgroup directory; files that do not exist are skipped."""
    if version == "v2":
        return [("memory.max", str(memory_bytes)), ("memory.swap.max", "0"), ("memory.oom.group", "1"),
                ("pids.max", str(processes))]
    return [("memory.limit_in_bytes", str(memory_bytes)), ("memory.memsw.limit_in_bytes", str(memory_bytes)),
            ("pids.max", str(processes))]


def create(memory_bytes: int, processes: int) -> list[str]:
    """New cgroup directories capping memory and processes; [] where cgroups are unavailable."""
    found = _parents()
    if found is None:
        return []
    parents, version = found
    name = f"dlm-sandbox-{os.getpid()}-{secrets.token_hex(6)}"
    made = []
    try:
        for parent in parents:
            made.append(os.path.join(parent, name))
            os.mkdir(made[-1])
            for file, value in _settings(version, memory_bytes, processes):
                path = os.path.join(made[-1], file)
                if os.path.exists(path):
                    with open(path, "w") as f:
                        f.write(value)
    except OSError:
        remove(made)
        raise
    return made


def remove(cgroups: list[str]) -> None:
    """Kill whatever is still in the cgroups and remove them (retrying briefly while tasks exit)."""
    for path in cgroups:
        for attempt in range(200):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                if attempt == 199:
                    raise
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids = [int(pid) for pid in f.read().split()]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)


@functools.cache
def available() -> bool:
    """Whether executions here get their own memory and pids cgroups."""
    try:
        remove(create(1 << 30, 64))
    except OSError:
        return False
    return _parents() is not None
