"""Run untrusted Python programs (a model's completion plus its tests) and score them pass/fail.

Every program gets a fresh ``python -I -S -B`` interpreter (``sys.executable``; no site, so no
site-packages and no ``exit()``) in its own session, a fresh temporary working directory that is
removed afterwards, a minimal environment (PATH; HOME and TMPDIR point at the working directory),
rlimits (CPU, address space, processes, file size, no core dumps) and a wall-clock timeout. On
timeout its whole process tree is killed, and whatever it leaves behind once it exits. Output is
read as it comes and cut at ``max_output_bytes`` per stream; stdin is empty. The start-up code
(``sandbox_bootstrap``) confines the interpreter before any untrusted code runs.

Pass marker: the harness puts a random nonce on the child's stdin; the bootstrap reads it, execs
the program as ``__main__`` and, only if that returns normally, writes the nonce to a pipe that is
not stdout. ``passed`` requires that nonce and exit status 0, so exiting early, an ``atexit`` hook
that hides a failure, printing a fake marker, redefining ``check`` or patching ``builtins``/``sys``
does not pass. Not forgery-proof: the nonce and the pipe are in the program's own process (the
bootstrap's frame), so code written against this harness (``sys._getframe(1).f_locals``) can
report a pass. No in-process design avoids that: the tests and the candidate share one interpreter.

Memory and processes (``tree_memory_cap_available()``): each program gets its own cgroup (v2 if
the caller's cgroup delegates ``memory`` and ``pids``, else v1) with ``tree_memory_mb`` of RAM +
swap and ``max_processes`` tasks for the whole tree; otherwise only the per-process
``RLIMIT_AS``, so a tree can hold up to ``max_processes`` x ``memory_mb`` (32 GiB by default),
and nothing at all bounds root without a throwaway uid, where ``RLIMIT_NPROC`` does not apply.

Unix sockets (``unix_socket_isolation_available()``: x86_64 and aarch64): unless ``network=True``
a seccomp filter refuses ``socket(AF_UNIX, ...)`` (EACCES) and ``io_uring_setup`` and kills the
process on a foreign syscall ABI (i386, x32); ``socketpair`` still works.

Isolation: where ``unshare`` can create namespaces (``network_isolation_available()``), the
program is PID 1 of a new PID namespace, so its whole process tree dies with it, and gets new
IPC and network namespaces (only a downed loopback and no shared abstract unix sockets: no
connections, not even to 127.0.0.1, unless ``network=True``). Running as root
(``filesystem_isolation_available()``), the bootstrap also makes a private mount namespace
read-only and nosuid, puts empty tmpfs over ``/tmp``, ``/var/tmp``, ``/run`` (``/var/run``) and
``/dev/shm`` and over the non-world-traversable ancestor of the interpreter (e.g. ``/root``,
grafting the stdlib back), mounts a size-capped tmpfs as the working directory, then drops to a
throwaway uid with no groups, no capabilities and no_new_privs. So the program cannot write or
delete anything outside its working directory, can read only world-readable files, cannot signal
the harness, and ``RLIMIT_NPROC`` also caps fork bombs; ``multiprocessing`` locks fail (no
writable ``/dev/shm``). Not root but user namespaces allowed: the same namespaces inside a user
namespace, but the program keeps the caller's file access. Without namespaces: rlimits, cgroup,
seccomp, process-group kill and the throwaway directory; the network is reachable and
``os.kill(-1, 9)`` would hit the caller's processes. Never: CPU or disk I/O throttling, or
protection from kernel bugs.
"""
from __future__ import annotations

import functools
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from harness.scoring import sandbox_cgroup
from harness.scoring.sandbox_bootstrap import BOOTSTRAP, seccomp_available

_UID_BASE = 1 << 30  # throwaway uids are drawn from [_UID_BASE, 2 * _UID_BASE)
_READY = b"R"  # the bootstrap writes it before untrusted code runs; without it the sandbox failed

@dataclass
class ExecutionResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (the sandbox itself failed)
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``max_file_mb`` caps each file and, when confined, the whole working dir."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024  # address space per process
    tree_memory_mb: int = 2048  # RAM + swap of the whole process tree, where cgroups allow
    max_processes: int = 32  # pids.max per program with cgroups; RLIMIT_NPROC: per program when confined,
    # else all of the caller's uid (root: none)
    max_file_mb: int = 16
    max_output_bytes: int = 64_000  # per stream
    network: bool = False


@functools.cache
def _unshare() -> tuple[str, ...]:
    """``unshare`` arguments for new PID, mount, IPC and network namespaces (``--net`` last); () if unavailable."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    user = () if os.geteuid() == 0 else ("--user", "--map-root-user")
    args = (exe, *user, "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--net")
    try:
        probe = subprocess.run([*args, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return args if probe.returncode == 0 else ()


def network_isolation_available() -> bool:
    """Whether programs get their own network (and PID, IPC, mount) namespaces here."""
    return bool(_unshare())


def filesystem_isolation_available() -> bool:
    """Whether programs run as a throwaway uid on a read-only filesystem (needs root and namespaces)."""
    return os.geteuid() == 0 and network_isolation_available()


def unix_socket_isolation_available() -> bool:
    """Whether programs (without ``network=True``) cannot create AF_UNIX sockets (a seccomp filter)."""
    return seccomp_available()


def tree_memory_cap_available() -> bool:
    """Whether each program's whole process tree gets one memory and pids cap (its own cgroup)."""
    return sandbox_cgroup.available()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill(proc: subprocess.Popen, namespaced: bool) -> int:
    """Kill the program and all it started; return the exit status once they are all gone.

    With a PID namespace, killing its init (``unshare``'s child) makes the kernel kill and reap
    the rest before ``unshare`` can exit; killing ``unshare`` first would leave that teardown running.
    """
    if namespaced and proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                children = f.read().split()
        except OSError:
            children = []
        for pid in children:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)  # stragglers without a PID namespace; no-op once the group is gone
    return proc.wait()


def _collect(proc: subprocess.Popen, result_fd: int, limits: SandboxLimits) -> tuple[dict[int, bytearray], bool]:
    """Read stdout, stderr and the result pipe until all close or the deadline; cap what is kept."""
    deadline = time.monotonic() + limits.timeout_s
    caps = {proc.stdout.fileno(): limits.max_output_bytes, proc.stderr.fileno(): limits.max_output_bytes,
            result_fd: 64}
    kept = {fd: bytearray() for fd in caps}
    pidfd = os.pidfd_open(proc.pid)
    try:
        with selectors.DefaultSelector() as sel:
            for fd in (*caps, pidfd):
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return kept, True
                for key, _ in sel.select(remaining):
                    if key.fd == pidfd:  # exited: kill what it left behind so the pipes close
                        sel.unregister(pidfd)
                        _kill_group(proc.pid)
                        continue
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fd)
                    buf = kept[key.fd]
                    buf += data[: caps[key.fd] - len(buf)]
        return kept, False
    finally:
        os.close(pidfd)


def _command(workdir: str, result_fd: int, limits: SandboxLimits, cgroups: list[str]) -> list[str]:
    prefix = _unshare()
    if prefix and limits.network:
        prefix = prefix[:-1]  # drop --net
    uid = _UID_BASE + secrets.randbelow(_UID_BASE) if prefix and os.geteuid() == 0 else -1
    seccomp = int(not limits.network and seccomp_available())
    procs = ":".join(os.path.join(c, "cgroup.procs") for c in cgroups) or "-"
    args = (os.path.realpath(workdir), result_fd, uid, limits.cpu_s, limits.memory_mb << 20, limits.max_processes,
            limits.max_file_mb << 20, seccomp, procs)
    return [*prefix, sys.executable, "-I", "-S", "-B", "-c", BOOTSTRAP, *map(str, args)]


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run ``program`` sandboxed; passed = it ran to its end without raising and exited with status 0.

    ``returncode`` is that of ``unshare`` when namespaces are used: a signal death reads as 1.
    """
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="harness-sandbox-")
    cgroups: list[str] = []
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        try:
            cgroups = sandbox_cgroup.create(limits.tree_memory_mb << 20, limits.max_processes)
        except OSError as e:
            return ExecutionResult(False, "error", None, "", f"cannot create cgroup: {e}", time.monotonic() - start)
        return _execute(workdir, cgroups, limits, start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        sandbox_cgroup.remove(cgroups)


def _execute(workdir: str, cgroups: list[str], limits: SandboxLimits, start: float) -> ExecutionResult:
    """Start the bootstrap on ``workdir/program.py``, collect its output and verdict, kill what is left."""
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    result_r, result_w = os.pipe()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    try:
        proc = subprocess.Popen(_command(workdir, result_w, limits, cgroups), stdin=nonce_r,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(result_w,), cwd=workdir,
                                env=env, start_new_session=True)
    except OSError as e:
        os.close(result_r)
        return ExecutionResult(False, "error", None, "", f"cannot start sandbox: {e}", time.monotonic() - start)
    finally:
        os.close(nonce_r)
        os.close(result_w)
    with proc:
        try:
            kept, timed_out = _collect(proc, result_r, limits)
        finally:
            returncode = _kill(proc, namespaced=bool(_unshare()))
            os.close(result_r)
        out, err = (kept[s.fileno()].decode("utf-8", "replace") for s in (proc.stdout, proc.stderr))
    marker = bytes(kept[result_r])
    passed = not timed_out and returncode == 0 and marker == _READY + nonce
    status = ("timeout" if timed_out else "passed" if passed
              else "failed" if marker.startswith(_READY) else "error")
    return ExecutionResult(passed, status, returncode, out, err, time.monotonic() - start)


def check_program(program_and_tests: str, entry_point_call: str | None = None,
                  limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Score code that includes its tests; ``entry_point_call`` (e.g. ``check(f)``) is appended if given.

    The pass trailer is not source text: the bootstrap writes the nonce after the code returns.
    """
    if entry_point_call:
        program_and_tests = f"{program_and_tests}\n{entry_point_call}\n"
    return run_program(program_and_tests, limits)


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(),
             workers: int | None = None) -> list[ExecutionResult]:
    """Run programs concurrently (``workers`` defaults to the CPU count); results in input order."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda program: run_program(program, limits), programs))
