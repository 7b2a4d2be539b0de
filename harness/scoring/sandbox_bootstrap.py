"""Start-up code the sandboxed interpreter runs before the untrusted program (``python -c BOOTSTRAP``).

argv: working directory, result fd, uid (-1: no confinement), CPU seconds, address-space bytes,
processes, file bytes, seccomp (1: refuse AF_UNIX sockets and io_uring), cgroup.procs paths
(``:``-joined, or ``-``); the nonce arrives on stdin.
"""
from __future__ import annotations

import os

# (AUDIT_ARCH, socket, io_uring_setup) syscall numbers for the seccomp filter, by machine
SECCOMP_ARCHES = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}


def seccomp_available() -> bool:
    """Whether the bootstrap can refuse AF_UNIX sockets here (a known architecture)."""
    return os.uname().machine in SECCOMP_ARCHES


MASKED = ("/tmp", "/var/tmp", "/run", "/var/run", "/dev/shm")  # empty tmpfs over these when confined

BOOTSTRAP = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def _check(ret):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret

def _syscall(nr, *args):  # open_tree 428, move_mount 429, mount_setattr 442
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _check(libc.syscall(ctypes.c_long(nr), *args))

def _mount(target, flags, opts):
    _check(libc.mount(b"tmpfs", target.encode(), b"tmpfs", ctypes.c_ulong(flags), opts.encode()))

def _masks(prefix):
    """The non-world-traversable ancestor of the interpreter (e.g. /root), then MASKED."""
    parts, found = prefix.split("/"), []
    for i in range(2, len(parts)):
        if not os.stat("/".join(parts[:i])).st_mode & 0o001:
            found.append("/".join(parts[:i]))
            break
    for path in map(os.path.realpath, MASKED):
        if os.path.isdir(path) and path not in found:
            found.append(path)
    return found

def _confine(workdir, uid, file_bytes, source):
    at_fdcwd, at_recursive = -100, 0x8000
    os.umask(0o022)
    prefix = os.path.realpath(sys.base_prefix)
    masks = _masks(prefix)
    covered = any(prefix == m or prefix.startswith(m + "/") for m in masks)
    tree = _syscall(428, at_fdcwd, prefix.encode(), 1 | at_recursive) if covered else -1  # OPEN_TREE_CLONE
    for path in masks:
        _mount(path, 0x2 | 0x4, "size=64k,nr_inodes=64,mode=755")  # MS_NOSUID | MS_NODEV
    if covered:  # graft the stdlib back
        os.makedirs(prefix, exist_ok=True)
        _syscall(429, tree, b"", at_fdcwd, prefix.encode(), 4)  # MOVE_MOUNT_F_EMPTY_PATH
        os.close(tree)
    os.makedirs(workdir, exist_ok=True)
    readonly = (ctypes.c_uint64 * 4)(0x1 | 0x2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    _syscall(442, at_fdcwd, b"/", at_recursive, readonly, 32)
    _mount(workdir, 0x2 | 0x4, f"size={file_bytes},nr_inodes=4096,mode=700,uid={uid},gid={uid}")
    os.chdir(workdir)
    with open("program.py", "wb") as f:
        f.write(source)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _check(libc.prctl(1, 9, 0, 0, 0))  # PR_SET_PDEATHSIG = SIGKILL again: the uid change cleared it

def _seccomp():
    """Refuse socket(AF_UNIX, ...) and io_uring_setup with EACCES; kill on a foreign ABI (i386, x32)."""
    arch, socket_nr, io_uring_nr = SECCOMP_ARCHES[os.uname().machine]
    kill, allow, refuse = 0x80000000, 0x7FFF0000, 0x00050000 | 13
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    code = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0),
            (jge, 0, 1, 0x40000000), (ret, 0, 0, kill), (jeq, 0, 2, socket_nr), (ld, 0, 0, 16),
            (jeq, 2, 1, 1), (jeq, 1, 0, io_uring_nr), (ret, 0, 0, allow), (ret, 0, 0, refuse)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(code))(*(Filter(*c) for c in code))
    _check(libc.prctl(22, 2, ctypes.byref(Program(len(code), filters)), 0, 0))  # SECCOMP_MODE_FILTER

def _main(workdir, fd, uid, cpu, memory, processes, file_bytes, seccomp, cgroups):
    import os, resource, sys
    nonce = b""
    while chunk := os.read(0, 64):
        nonce += chunk
    write = os.write
    for procs in cgroups.split(":") if cgroups != "-" else ():
        with open(procs, "w") as f:
            f.write("0")
    with open("program.py", "rb") as f:
        source = f.read()
    for res, limit in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                       (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_FSIZE, file_bytes),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (limit, limit))
    if uid >= 0:
        _confine(workdir, uid, file_bytes, source)
    _check(libc.prctl(38, 1, 0, 0, 0))  # PR_SET_NO_NEW_PRIVS
    if seccomp:
        _seccomp()
    write(fd, b"R")  # _READY
    main = sys.modules["__main__"].__dict__
    keep = {"__name__", "__doc__", "__builtins__", "__spec__", "__loader__", "__package__", "__annotations__"}
    for name in set(main) - keep:  # the program starts with a clean module namespace
        del main[name]
    main["__file__"] = "program.py"
    sys.argv[:] = ["program.py"]
    exec(compile(source, "program.py", "exec"), main)
    write(fd, nonce)

_main(sys.argv[1], *map(int, sys.argv[2:9]), sys.argv[9])
'''.replace("import ctypes, os, sys\n",
              f"import ctypes, os, sys\nSECCOMP_ARCHES = {SECCOMP_ARCHES!r}\nMASKED = {MASKED!r}\n", 1)
