"""The code sandbox against hostile programs, and the pass@k estimator."""
from __future__ import annotations

import os
import resource
import socket
import stat
import tempfile
import textwrap
import time
from math import comb
from pathlib import Path

import pytest

from harness.scoring.passk import mean_pass_at_k, pass_at_k
from harness.scoring.sandbox import (
    SandboxLimits,
    check_program,
    filesystem_isolation_available,
    network_isolation_available,
    run_many,
    run_program,
    tree_memory_cap_available,
    unix_socket_isolation_available,
)

FAST = SandboxLimits(timeout_s=5)
needs_netns = pytest.mark.skipif(not network_isolation_available(), reason="unshare cannot create namespaces here")
needs_seccomp = pytest.mark.skipif(not unix_socket_isolation_available(),
                                   reason="no seccomp filter for this architecture: AF_UNIX sockets are not refused")
needs_cgroup = pytest.mark.skipif(not tree_memory_cap_available(),
                                  reason="no writable cgroup (v2 delegating memory+pids, or v1 memory and pids) here")
needs_fs = pytest.mark.skipif(not filesystem_isolation_available(),
                              reason="read-only filesystem and throwaway uid need root and namespaces")

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TESTS = "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def run(code: str, limits: SandboxLimits = FAST):
    return run_program(textwrap.dedent(code), limits)


def sandbox_processes() -> list[str]:
    """Processes still running the sandbox bootstrap (or the sleeper left behind below)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"def _main(workdir" in cmdline or b"1000.123" in cmdline:
            found.append(pid)
    return found


def assert_contained(result, status: str = "failed") -> None:
    assert not result.passed
    assert result.status == status, result
    assert sandbox_processes() == []


# --- scoring ----------------------------------------------------------------------------------

def test_correct_program_passes_and_wrong_one_fails():
    right = check_program(PROMPT + "    return a + b\n" + TESTS, "check(add)", FAST)
    assert right.passed and right.status == "passed" and right.returncode == 0, right
    wrong = check_program(PROMPT + "    return a - b\n" + TESTS, "check(add)", FAST)
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_run_many_preserves_order_and_captures_output():
    results = run_many([f"print({i})" for i in range(6)], FAST, workers=2)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert all(r.passed for r in results)


def test_fresh_working_directory_minimal_env_and_cleanup():
    r = run("""
        import os, sys
        assert os.listdir(".") == ["program.py"], os.listdir(".")
        assert os.environ["HOME"] == os.getcwd() and "PYTHONPATH" not in os.environ
        open("scratch.txt", "w").write("ok")
        print(os.getcwd())
    """)
    assert r.passed, r
    assert not Path(r.stdout.strip()).exists()


@pytest.mark.parametrize("exit_early", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"])
def test_exit_before_the_tests_is_not_a_pass(exit_early):
    r = check_program(PROMPT + f"    return a - b\n{exit_early}\n" + TESTS, "check(add)", FAST)
    assert r.returncode == 0 and not r.passed and r.status == "failed", r


@pytest.mark.parametrize("cheat", [
    "import builtins\nbuiltins.AssertionError = type('Fake', (Exception,), {})",
    "def check(candidate):\n    pass",
    "import sys, os\nsys.exit = lambda *a: None\nos._exit = lambda *a: None\nprint = lambda *a, **k: None",
    "import atexit, os\natexit.register(os._exit, 0)",  # hides the failure's exit status
    "import sys\nsys.excepthook = lambda *a: None",
])
def test_patching_the_checker_is_not_a_pass(cheat):
    r = check_program(PROMPT + "    return a - b\n" + cheat + "\n" + TESTS, "check(add)", FAST)
    assert not r.passed and r.status == "failed", r


def test_forging_the_pass_marker_fails():
    r = run("""
        import os, sys
        print("PASSED")
        for fd in range(3, 64):
            try:
                os.write(fd, b"R" + b"0" * 32)
            except OSError:
                pass
        sys.exit(0)
    """)
    assert r.returncode == 0
    assert_contained(r)


# --- containment ------------------------------------------------------------------------------

@pytest.mark.parametrize("loop", ["while True:\n    pass\n", "import os\nos.setsid()\nwhile True:\n    pass\n"])
def test_infinite_loop_times_out_fast(loop):
    start = time.monotonic()
    r = run(loop, SandboxLimits(timeout_s=1))
    assert time.monotonic() - start < 3
    assert_contained(r, "timeout")


@pytest.mark.skipif(os.geteuid() == 0 and not (filesystem_isolation_available() or tree_memory_cap_available()),
                    reason="root without a throwaway uid or cgroup: RLIMIT_NPROC does not apply, nothing caps the bomb")
@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()\n",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
])
def test_fork_bomb_is_contained(bomb):
    start = time.monotonic()
    r = run(bomb, SandboxLimits(timeout_s=1.5, max_processes=16))
    assert time.monotonic() - start < 5
    assert not r.passed and r.status in ("failed", "timeout")
    assert sandbox_processes() == []
    assert run("print('still healthy')").passed


def test_leftover_processes_are_killed():
    r = run("""
        import os
        if os.fork() == 0:
            os.setsid()
            os.execv("/bin/sleep", ["sleep", "1000.123"])
    """)
    assert r.passed, r
    assert sandbox_processes() == []


def test_huge_allocation_fails():
    r = run("x = bytearray(10 * 1024 ** 3)\n")
    assert "MemoryError" in r.stderr
    assert_contained(r)


def test_gigabyte_of_output_is_truncated_in_bounded_time_and_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    r = run("""
        import sys
        chunk = "x" * (1 << 20)
        for _ in range(1024):
            sys.stdout.write(chunk)
            sys.stderr.write(chunk)
        assert False
    """, SandboxLimits(timeout_s=20, max_output_bytes=10_000))
    assert time.monotonic() - start < 20
    assert len(r.stdout) == len(r.stderr) == 10_000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB
    assert_contained(r)


def test_killing_the_parent_does_not_reach_the_harness():
    r = run("""
        import os, time
        os.kill(os.getppid(), 9)
        time.sleep(0.2)
        assert False, "tests fail"
    """)
    assert not r.passed  # and this test process is still here


@needs_netns
@pytest.mark.parametrize("address", ["127.0.0.1", "1.1.1.1"])
def test_no_network(address):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1] if address == "127.0.0.1" else 80
        r = run(f"""
            import socket
            socket.create_connection(({address!r}, {port}), timeout=3)
        """)
        assert "Network is unreachable" in r.stderr, r
        assert_contained(r)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


@needs_netns
def test_network_flag_keeps_the_host_network():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n",
                SandboxLimits(timeout_s=5, network=True))
        assert r.passed, r


def visible_parent() -> Path:
    """A writable folder the confined sandbox still sees: not under the folders it masks with an empty
    tmpfs (/tmp, /run, ...: a clone may live there) and reachable by anyone along its whole path."""
    from harness.scoring.sandbox_bootstrap import MASKED

    def visible(path: Path) -> bool:
        real = Path(os.path.realpath(path))
        if any(real == Path(m) or Path(m) in real.parents for m in map(os.path.realpath, MASKED)):
            return False
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in [real, *real.parents])

    cache = Path(__file__).resolve().parents[1] / ".pytest_cache"
    cache.mkdir(exist_ok=True)
    for folder in (cache, Path("/var/lib"), Path("/srv"), Path("/opt"), Path("/mnt")):
        if folder.is_dir() and os.access(folder, os.W_OK) and visible(folder):
            return folder
    pytest.skip("no writable folder outside the sandbox's masked folders")


@pytest.fixture
def outside_dir():
    """A world-writable directory with a world-writable file and a root-only secret, outside the sandbox
    and visible from it (see ``visible_parent``)."""
    cache = visible_parent()
    path = Path(tempfile.mkdtemp(prefix="sandbox-outside-", dir=cache))
    path.chmod(0o777)
    (path / "keep.txt").write_text("original")
    (path / "keep.txt").chmod(0o666)
    (path / "secret.txt").write_text("secret")
    (path / "secret.txt").chmod(stat.S_IRUSR)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
    Path(f"{path}_escape").unlink(missing_ok=True)  # only there if the sandbox leaked


@needs_fs
def test_cannot_write_outside_the_working_directory(outside_dir):
    escape = outside_dir / "escape.txt"
    tmp_escape = Path(f"{outside_dir}_escape")
    r = run(f"""
        for path in [{str(escape)!r}, {str(tmp_escape)!r}, "/dev/shm/escape", "/escape"]:
            try:
                open(path, "w").write("escaped")
            except OSError as e:
                print("blocked", path, e)
            else:
                print("WROTE", path)
        assert False
    """)
    assert "WROTE" not in r.stdout and r.stdout.count("blocked") == 4, r.stdout
    assert not escape.exists() and not tmp_escape.exists()
    assert_contained(r)


@needs_fs
def test_cannot_delete_or_modify_files_outside(outside_dir):
    r = run(f"""
        import os, shutil
        for attempt in (lambda: os.remove({str(outside_dir / "keep.txt")!r}),
                        lambda: open({str(outside_dir / "keep.txt")!r}, "w"),
                        lambda: os.chmod({str(outside_dir)!r}, 0o700),
                        lambda: shutil.rmtree({str(outside_dir)!r})):
            try:
                attempt()
            except OSError:
                pass
        print(open({str(outside_dir / "secret.txt")!r}).read())
    """)
    assert "PermissionError" in r.stderr, r
    assert_contained(r)
    assert (outside_dir / "keep.txt").read_text() == "original"
    assert stat.S_IMODE(outside_dir.stat().st_mode) == 0o777


@needs_fs
def test_runs_unprivileged():
    r = run("import os\nassert os.getuid() != 0 and os.geteuid() != 0 and os.getgroups() == []\n")
    assert r.passed, r


@pytest.fixture(params=["tmp", "outside"])
def unix_server(request, outside_dir):
    """A listening, world-writable unix socket of the test's own: in /tmp, or in a directory the sandbox sees."""
    parent = Path(tempfile.mkdtemp(prefix="sandbox-sock-")) if request.param == "tmp" else outside_dir
    parent.chmod(0o777)
    path = parent / "server.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        path.chmod(0o777)
        server.listen()
        server.setblocking(False)
        yield server, path
    path.unlink()
    if request.param == "tmp":
        parent.rmdir()


@needs_seccomp
def test_unix_socket_outside_is_unreachable(unix_server):
    server, path = unix_server
    r = run(f"""
        import socket
        a, b = socket.socketpair()  # a private pair stays possible (multiprocessing uses it)
        a.sendall(b"x"); assert b.recv(1) == b"x"
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(path)!r})
    """)
    assert "PermissionError" in r.stderr and "s = socket.socket" in r.stderr, r
    assert_contained(r)
    with pytest.raises(BlockingIOError):
        server.accept()


@needs_fs
def test_tmp_run_and_shm_are_empty():
    r = run("""
        import os
        here = os.getcwd()  # the working directory itself may sit in one of them
        for path in ("/tmp", "/var/tmp", "/run", "/var/run", "/dev/shm"):
            expected = [os.path.basename(here)] if os.path.realpath(path) == os.path.dirname(here) else []
            assert os.listdir(path) == expected, (path, os.listdir(path))
    """)
    assert r.passed, r


TREE = """
import os, time
pids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (150 << 20)  # touched: 150 MiB resident in each of 4 children
        time.sleep(0.5)
        os._exit(0)
    pids.append(pid)
assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids), "a child was killed"
"""


@needs_cgroup
def test_process_tree_shares_one_memory_cap():
    roomy = run_program(TREE, SandboxLimits(timeout_s=20, memory_mb=512, tree_memory_mb=1024))
    assert roomy.passed, roomy
    tight = run_program(TREE, SandboxLimits(timeout_s=20, memory_mb=512, tree_memory_mb=384))
    assert not tight.passed and tight.status == "failed", tight
    assert sandbox_processes() == []


@needs_cgroup
def test_process_cap_holds():
    r = run("""
        import os
        for _ in range(20):
            if os.fork() == 0:
                import time; time.sleep(2); os._exit(0)
    """, SandboxLimits(timeout_s=5, max_processes=8))
    assert "BlockingIOError" in r.stderr or "Resource temporarily unavailable" in r.stderr, r
    assert_contained(r)


def test_known_limit_frame_walking_forges_a_pass():
    """Documents the limit stated in the README: code aimed at this harness can read the nonce."""
    r = run("""
        import os, sys
        frame = sys._getframe(1).f_locals
        frame["write"](frame["fd"], frame["nonce"])
        os._exit(0)
        assert False, "never reached"
    """)
    assert r.passed, r


# --- pass@k -------------------------------------------------------------------------------------

PASS_AT_K_CASES = [  # n, c, k, expected
    (10, 3, 1, 0.3),
    (5, 0, 1, 0.0),
    (5, 0, 5, 0.0),
    (5, 5, 1, 1.0),
    (5, 5, 5, 1.0),
    (10, 8, 3, 1.0),  # k > n - c: every draw of k holds a correct sample
    (10, 3, 2, 1 - comb(7, 2) / comb(10, 2)),
    (200, 17, 10, 1 - comb(183, 10) / comb(200, 10)),
]


@pytest.mark.parametrize("n,c,k,expected", PASS_AT_K_CASES)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_mean_pass_at_k_and_bad_input():
    assert mean_pass_at_k([(10, 3), (5, 0), (5, 5)], 1) == pytest.approx((0.3 + 0 + 1) / 3)
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)
