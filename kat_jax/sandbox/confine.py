"""Kernel confinement for sandbox children: namespaces, private root, limits, privilege drop.

Runs inside the judge process (``enter_namespaces``, ``build_root``) and inside the program process
(``confine_program``), never in the host. Standard library + ctypes only.

Layout when everything is granted (root on Linux, as on our machines):

* the judge calls ``unshare(NEWNET | NEWNS | NEWPID | NEWIPC | NEWUTS)``: the program process it
  forks next is pid 1 of a fresh pid namespace (when it dies the kernel kills every process it
  left behind), sees a network namespace whose only interface is a loopback that is down (no
  connection anywhere, not even to the host's 127.0.0.1), and a private mount table;
* ``build_root`` mounts a size- and inode-limited tmpfs, bind-mounts the system and the Python
  installation into it read-only, adds /dev/{null,zero,random,urandom}, an empty /proc mount point
  and a writable /tmp owned by the job's uid; nothing else of the host file system (repositories,
  datasets, home directories, other jobs) exists there; it vanishes with the mount namespace;
* ``confine_program`` (in the program process) mounts a /proc of its own pid namespace, chroots,
  sets rlimits, drops to a fresh per-job uid/gid with no supplementary groups and
  ``no_new_privs``, and arms ``PDEATHSIG``.

Where a step is refused (no root, no namespaces) the caller records what was granted in the
``isolation`` report and continues with what is left: rlimits, a temporary directory, a scrubbed
environment and a private session are always applied.
"""
import ctypes
import errno
import os
import resource
import signal
import stat

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# Host directories every program may read (system libraries and /etc); the Python installation
# (sys.base_prefix) is added by the judge. Symlinks among them (merged /usr) are recreated as links.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("random", 1, 8), ("urandom", 1, 9))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _check(result: int, what: str) -> None:
  if result != 0:
    code = ctypes.get_errno()
    raise OSError(code, f"{what}: {os.strerror(code)}")


def mount(source, target, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else os.fsencode(s)
  _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def enter_namespaces() -> str:
  """Unshares all namespaces; returns "" on success or the reason they were refused."""
  flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
  try:
    _check(_libc.unshare(flags), "unshare(NEWNET|NEWNS|NEWPID|NEWIPC|NEWUTS)")
    # Keep every mount we make private to this namespace (never propagate to the host).
    mount(None, "/", None, MS_REC | MS_PRIVATE)
  except OSError as error:
    return str(error)
  return ""


def build_root(root: str, readonly_paths, uid: int, disk_bytes: int, disk_inodes: int) -> None:
  """Builds the program's private root file system at ``root`` (see the module docstring)."""
  mount("tmpfs", root, "tmpfs", MS_NOSUID,
        f"size={disk_bytes},nr_inodes={disk_inodes},mode=0755")
  old_umask = os.umask(0o022)
  try:
    for path in readonly_paths:
      path = os.path.normpath(path)
      target = root + path
      if os.path.islink(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
          os.symlink(os.readlink(path), target)
      elif os.path.isdir(path):
        if os.path.exists(target) and os.path.ismount(target):
          continue
        os.makedirs(target, exist_ok=True)
        mount(path, target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.makedirs(root + "/dev", exist_ok=True)
    for name, major, minor in _DEVICES:
      node = f"{root}/dev/{name}"
      os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
      os.chmod(node, 0o666)
    os.mkdir(root + "/proc", 0o555)
    for private in ("/tmp", "/dev/shm"):
      os.mkdir(root + private, 0o700)
      os.chown(root + private, uid, uid)
  finally:
    os.umask(old_umask)


def confine_program(*, root, mount_proc: bool, uid, limits: dict, workdir: str) -> dict:
  """Confines the calling (program) process; returns what was granted. Raises on hard failure."""
  granted = {}
  if root:
    if mount_proc:
      mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chroot(root)
    granted["chroot"] = True
  os.chdir(workdir)
  _set_rlimits(limits)
  if uid is not None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    granted["uid"] = uid
  # Never regain privileges through set-uid binaries; die with the judge (re-armed after setuid,
  # which clears it).
  _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
  _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  return granted


def set_child_subreaper() -> None:
  """Makes orphaned descendants of the calling process its children (not init's)."""
  _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _set_rlimits(limits: dict) -> None:
  cpu = int(limits["cpu_time_s"])
  for which, value in (
      (resource.RLIMIT_CPU, cpu),                 # soft == hard: SIGKILL at the limit (pid-1 safe)
      (resource.RLIMIT_AS, limits["memory_bytes"]),
      (resource.RLIMIT_NPROC, limits["max_processes"]),
      (resource.RLIMIT_FSIZE, limits["file_size_bytes"]),
      (resource.RLIMIT_NOFILE, limits["open_files"]),
      (resource.RLIMIT_CORE, 0),
      (resource.RLIMIT_MEMLOCK, 0),
      (resource.RLIMIT_MSGQUEUE, 0),
  ):
    try:
      resource.setrlimit(which, (value, value))
    except (ValueError, OSError) as error:
      # Without CAP_SYS_RESOURCE a hard limit cannot be raised; lowering always works, so only
      # a limit already below ours can fail here, which is at least as strict.
      if getattr(error, "errno", None) not in (errno.EPERM, None):
        raise
      _, hard = resource.getrlimit(which)
      if hard == resource.RLIM_INFINITY or hard > value:
        raise


def scrubbed_environment(workdir: str) -> dict:
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
          "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
