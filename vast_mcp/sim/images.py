"""Image profiles: what a simulated instance looks like inside, after the image named at create.

Real instances differ from the machine the simulator runs on: the image decides which commands exist, which
shell `/bin/sh` is, which environment the container's PID 1 has (SSH sessions do not get it), and what the
shell start-up files print. A profile lists those facts; both host backends turn it into a tree of command
links (`materialize`) that replaces the host's command folders inside the instance. Every fact is sourced in
`docs/image-profiles.md`. An image outside the catalogue gets `DEFAULT`, a slim Debian with Python: never the
full host.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Where the host's commands are looked up (in this order), so that a link points at a real program under /usr
# and never at a per-user shim (pyenv, a venv) that the instance cannot see.
_HOST_DIRS = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin")
BUSYBOX = "/bin/busybox"
SESSION_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what sshd gives a session


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_COREUTILS = _words(
    "[ b2sum base64 basename cat chgrp chmod chown cksum comm cp csplit cut date dd df dirname du echo env expand "
    "expr factor false fmt fold head hostid id install join link ln logname ls md5sum mkdir mkfifo mknod mktemp "
    "mv nice nl nohup nproc numfmt od paste pathchk pr printenv printf ptx pwd readlink realpath rm rmdir seq "
    "sha1sum sha224sum sha256sum sha384sum sha512sum shred shuf sleep sort split stat stdbuf stty sum sync tac "
    "tail tee test timeout touch tr true truncate tsort tty uname unexpand uniq unlink users wc who whoami yes"
)
# Debian's and Ubuntu's essential set besides coreutils: bash, dash, tar, gzip, findutils, grep, sed, mawk,
# util-linux (setsid, mount...), debianutils (which), hostname, perl-base, login.
_ESSENTIAL = _words(
    "bash dash sh tar gzip gunzip zcat find xargs grep egrep fgrep sed awk mawk setsid mount umount flock "
    "getopt kill more su which hostname perl zgrep uncompress"
)
_PROCPS = _words("ps pkill pgrep top free uptime watch pidof")
_NET = _words("curl wget")
_DEVEL = _words("gcc g++ cc make git patch")
_VAST_TOOLS = _words("curl wget rsync tmux zstd xz less nano git ssh scp openssl unzip")
_PYTHON = ("python3", "python")


@dataclass(frozen=True)
class ImageProfile:
    """What an instance of one family of images offers."""

    name: str
    patterns: tuple[str, ...]  # image references (fnmatch, lower case) this profile stands for
    commands: tuple[str, ...]  # in /usr/bin: on the PATH SSH sessions get
    extra_dirs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # container-only folders: name -> links
    sh: str = "dash"  # what /bin/sh is: dash, bash or busybox (ash)
    login_shell: str = "/bin/bash"  # root's shell in /etc/passwd, which sshd runs every command with
    container_env: dict[str, str] = field(default_factory=dict)  # PID 1's environment (the image's ENV lines)
    bashrc: str = ""  # /root/.bashrc as the image ships it, plus what Vast appends
    sha256_z: bool = True  # coreutils >= 8.30: `sha256sum -z`
    busybox: bool = False  # every command is a BusyBox applet
    notes: str = ""

    def has(self, command: str) -> bool:
        return command in self.commands or any(command in links for links in self.extra_dirs.values())


# /root/.bashrc of Debian images (base-files' dot.bashrc) has no interactive guard, so bash runs all of it for
# `ssh host cmd`; the echo stands for whatever an image or a user adds there (conda init, banners).
DEBIAN_BASHRC = (
    "# ~/.bashrc: executed by bash(1) for non-login shells.\n"
    "# (Debian's root .bashrc: no interactive guard)\n"
    'echo "welcome to $(hostname 2>/dev/null || echo this container)"\n'
)
# Ubuntu's /root/.bashrc returns at once for non-interactive shells.
UBUNTU_BASHRC = "# ~/.bashrc (Ubuntu)\n[ -z \"$PS1\" ] && return\necho 'interactive shell'\n"
# What Vast appends for SSH launches: start (or attach) tmux unless ~/.no_auto_tmux exists. Whether it fires for
# a non-interactive `ssh host cmd` is not confirmed; the simulator takes the noisy answer (a line on stdout)
# where there is no terminal, and attaches only with one.
VAST_TMUX = (
    'if [ ! -e "$HOME/.no_auto_tmux" ] && [ -z "$TMUX" ]; then\n'
    "  if [ -t 0 ] && [ -t 1 ]; then exec tmux new-session -A -s ssh_tmux; fi\n"
    '  echo "[vast] tmux auto-attach (touch ~/.no_auto_tmux to turn it off)"\n'
    "fi\n"
)

_DEBIAN_ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CUDA_ENV = {
    "PATH": "/usr/local/nvidia/bin:/usr/local/cuda/bin:" + _DEBIAN_ENV_PATH,
    "LD_LIBRARY_PATH": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
    "CUDA_VERSION": "12.1.1",
}
_CONDA: dict[str, tuple[str, ...]] = {"/opt/conda/bin": ("python", "python3", "pip", "conda", "torchrun")}
_VENV: dict[str, tuple[str, ...]] = {"/venv/main/bin": ("python", "python3", "pip")}
# PyTorch's launcher, next to the Python that has torch (the images' pip installs it as a console script).
_VENV_TORCH: dict[str, tuple[str, ...]] = {"/venv/main/bin": ("python", "python3", "pip", "torchrun")}

_DEBIAN_SLIM = (*_COREUTILS, *_ESSENTIAL)
_UBUNTU = (*_COREUTILS, *_ESSENTIAL)  # ubuntu:22.04 has no procps, curl, wget, python3, rsync, zstd, xz

PYTHON_SLIM = ImageProfile(
    name="python-slim",
    patterns=("python:3*-slim*", "python:slim*"),
    commands=(*_DEBIAN_SLIM, "python3", "python", "pip", "pip3"),
    container_env={"PATH": _DEBIAN_ENV_PATH, "LANG": "C.UTF-8", "PYTHON_VERSION": "3.11.9"},
    bashrc=DEBIAN_BASHRC,
    notes="Debian slim plus Python in /usr/local/bin: no rsync, zstd, xz, curl, wget or ps.",
)
PYTORCH_RUNTIME = ImageProfile(
    name="pytorch-runtime",
    patterns=("pytorch/pytorch", "pytorch/pytorch:latest", "pytorch/pytorch:*-runtime"),
    commands=_UBUNTU,
    extra_dirs=_CONDA,
    container_env={
        **_CUDA_ENV,
        "PATH": "/opt/conda/bin:" + _CUDA_ENV["PATH"],
        "PYTORCH_VERSION": "2.3.1",
    },
    bashrc=UBUNTU_BASHRC,
    notes="Python only in /opt/conda/bin, reached through the image's ENV PATH; no curl, wget, rsync or zstd.",
)
PYTORCH_DEVEL = ImageProfile(
    name="pytorch-devel",
    patterns=("pytorch/pytorch:*-devel",),
    commands=(*_UBUNTU, *_DEVEL),
    extra_dirs=_CONDA,
    container_env=PYTORCH_RUNTIME.container_env,
    bashrc=UBUNTU_BASHRC,
    notes="As -runtime, plus the CUDA toolkit, compilers and git from the cuda -devel base.",
)
CUDA_BASE = ImageProfile(
    name="cuda-base",
    patterns=("nvidia/cuda:*-base-ubuntu*", "nvidia/cuda:*-runtime-ubuntu*"),
    commands=_UBUNTU,
    container_env=_CUDA_ENV,
    bashrc=UBUNTU_BASHRC,
    notes="Ubuntu with CUDA libraries: no python3, curl (purged by the build), wget, rsync or zstd.",
)
CUDA_DEVEL = ImageProfile(
    name="cuda-devel",
    patterns=("nvidia/cuda:*-devel-ubuntu*",),
    commands=(*_UBUNTU, *_DEVEL),
    container_env=_CUDA_ENV,
    bashrc=UBUNTU_BASHRC,
    notes="As cuda-base plus compilers: still no python3 and no curl.",
)
UBUNTU_2204 = ImageProfile(
    name="ubuntu-22.04",
    patterns=("ubuntu:22.04", "ubuntu:jammy", "ubuntu", "ubuntu:latest"),
    commands=_UBUNTU,
    container_env={"PATH": _DEBIAN_ENV_PATH},
    bashrc=UBUNTU_BASHRC,
    notes="No python3, curl, wget, rsync, zstd or ps.",
)
UBUNTU_1804 = ImageProfile(
    name="ubuntu-18.04",
    patterns=("ubuntu:18.04", "ubuntu:bionic", "nvidia/cuda:*-ubuntu18.04"),
    commands=_UBUNTU,
    container_env={"PATH": _DEBIAN_ENV_PATH},
    bashrc=UBUNTU_BASHRC,
    sha256_z=False,
    notes="coreutils 8.28: `sha256sum` has no -z; no python3 or curl.",
)
VASTAI_BASE = ImageProfile(
    name="vastai-base",
    patterns=("vastai/base-image*",),
    commands=(*_UBUNTU, *_PROCPS, *_VAST_TOOLS, "python3"),
    extra_dirs=_VENV,
    container_env={"PATH": "/venv/main/bin:" + _DEBIAN_ENV_PATH, "DATA_DIRECTORY": "/workspace"},
    bashrc=VAST_TMUX + UBUNTU_BASHRC,  # the hook ahead of Ubuntu's guard: the harder of the two possible answers
    notes="Vast's own base: curl, wget, rsync, tmux; a Python venv in /venv/main; tmux auto-attach on login.",
)
VASTAI_PYTORCH = ImageProfile(
    name="vastai-pytorch",
    patterns=("vastai/pytorch*",),
    commands=VASTAI_BASE.commands,
    extra_dirs=_VENV_TORCH,
    container_env=VASTAI_BASE.container_env,
    bashrc=VASTAI_BASE.bashrc,
    notes="vastai/base-image with PyTorch in the /venv/main venv.",
)
BUSYBOX_PROFILE = ImageProfile(
    name="busybox",
    patterns=("busybox", "busybox:*"),
    commands=(),  # every applet of the host's busybox (see `materialize`)
    sh="busybox",
    login_shell="/bin/sh",
    container_env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
    busybox=True,
    sha256_z=False,
    notes="BusyBox applets only: ash as /bin/sh (rejects `kill -- -PGID`), no `find -printf`, no bash or python.",
)
DEFAULT = ImageProfile(
    name="default-slim",
    patterns=(),
    commands=PYTHON_SLIM.commands,
    container_env=PYTHON_SLIM.container_env,
    bashrc=DEBIAN_BASHRC,
    notes="Any image not in the catalogue: Debian slim with Python, so nothing the host happens to have leaks in.",
)

CATALOGUE: tuple[ImageProfile, ...] = (
    PYTHON_SLIM,
    PYTORCH_RUNTIME,
    PYTORCH_DEVEL,
    CUDA_BASE,
    CUDA_DEVEL,
    UBUNTU_2204,
    UBUNTU_1804,
    VASTAI_BASE,
    VASTAI_PYTORCH,
    BUSYBOX_PROFILE,
)
# One image reference per profile, for tests and the profile matrix.
EXAMPLES: dict[str, str] = {
    "python-slim": "python:3.11-slim",
    "pytorch-runtime": "pytorch/pytorch:2.3.1-cuda12.1-cudnn8-runtime",
    "pytorch-devel": "pytorch/pytorch:2.3.1-cuda12.1-cudnn8-devel",
    "cuda-base": "nvidia/cuda:12.1.1-base-ubuntu22.04",
    "cuda-devel": "nvidia/cuda:12.1.1-devel-ubuntu22.04",
    "ubuntu-22.04": "ubuntu:22.04",
    "ubuntu-18.04": "ubuntu:18.04",
    "vastai-base": "vastai/base-image:cuda-12.1-auto",
    "vastai-pytorch": "vastai/pytorch:2.3.1-cuda-12.1.1",
    "busybox": "busybox:1.36",
    "default-slim": "example/unknown:1.0",
}


def profile_for(image: str | None) -> ImageProfile:
    """The profile of an image reference; `DEFAULT` for anything not in the catalogue (or no image)."""
    ref = (image or "").strip().lower()
    if ref.startswith("docker.io/"):
        ref = ref.removeprefix("docker.io/")
    for profile in CATALOGUE:
        if any(fnmatch.fnmatchcase(ref, p) for p in profile.patterns):
            return profile
    return DEFAULT


def host_command(name: str) -> str | None:
    """Absolute path of a host program for `name`, looked up in the system folders only."""
    if name == "sh":
        name = "dash"
    for candidate in ("python3", "python") if name in _PYTHON else (name,):
        for folder in _HOST_DIRS:
            path = os.path.join(folder, candidate)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    if name in _PYTHON:
        # A machine without a system Python still runs the simulator: its own interpreter stands in.
        return os.path.realpath(sys.executable)
    return None


def busybox_applets() -> list[str]:
    import subprocess

    try:
        out = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [a for a in out.split() if a and "/" not in a]


def busybox_available() -> bool:
    return os.path.isfile(BUSYBOX) and os.access(BUSYBOX, os.X_OK)


@dataclass(frozen=True)
class Materialized:
    """A profile laid out on the instance's disk: `tree/<abs dir>/<command>` links for every command folder."""

    tree: Path
    dirs: tuple[str, ...]  # absolute folders inside the instance that the tree provides (usr/bin, opt/...)


# The folders whose content a profile replaces inside an instance.
COVERED = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


def materialize(profile: ImageProfile, tree: Path, *, host_prefix: str = "") -> Materialized:
    """Write the profile's command links under `tree` (replacing what was there). Blocking.

    Each link points at `host_prefix` + the host program's path: the sshd backend covers /usr/bin and friends
    inside the namespace and reaches the host's programs through a second view of /usr mounted at the prefix;
    the in-process backend links to the host paths directly (empty prefix).
    """
    if tree.exists():
        shutil.rmtree(tree)
    for folder in COVERED:
        (tree / folder.lstrip("/")).mkdir(parents=True, exist_ok=True)
    usr_bin = tree / "usr" / "bin"
    sh_target: str | None
    if profile.busybox:
        box = BUSYBOX if busybox_available() else None
        names = busybox_applets() if box else []
        for name in names:
            _link(usr_bin / name, host_prefix, box)
        _link(usr_bin / "busybox", host_prefix, box)
        sh_target = box
    else:
        for name in profile.commands:
            _link(usr_bin / name, host_prefix, host_command(name))
        # A machine without dash (not Debian) still gives the instance a POSIX shell.
        sh_target = host_command(profile.sh) or host_command("bash") or "/bin/sh"
        if not profile.sha256_z:
            _write_wrapper(usr_bin / "sha256sum", host_prefix, host_command("sha256sum"))
    (usr_bin / "sh").unlink(missing_ok=True)
    _link(usr_bin / "sh", host_prefix, sh_target)
    dirs: list[str] = list(COVERED)
    for folder, links in profile.extra_dirs.items():
        target = tree / folder.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for name in links:
            if name == "torchrun":
                _write_torchrun(target / name, folder)
                continue
            source = "pip3" if name == "pip" else name
            _link(target / name, host_prefix, host_command("python3" if source.startswith("python") else source))
        dirs.append(folder)
    return Materialized(tree, tuple(dirs))


def _link(path: Path, prefix: str, target: str | None) -> None:
    if target is None or path.exists() or path.is_symlink():
        return
    path.symlink_to(_under(prefix, target))


def _under(prefix: str, target: str) -> str:
    if not prefix:
        return target
    real = os.path.realpath(target)
    if real.startswith("/usr/"):
        return prefix + real.removeprefix("/usr")
    return real  # outside /usr (a stand-in interpreter): visible as is


def _write_torchrun(path: Path, folder: str) -> None:
    """`torchrun` as the images install it: PyTorch's launcher run by the Python beside it (the machine's Python,
    which has torch once `tests/run.sh` installed it; see the README)."""
    path.write_text(f'#!/bin/sh\nexec {folder}/python3 -m torch.distributed.run "$@"\n')
    path.chmod(0o755)


def _write_wrapper(path: Path, prefix: str, target: str | None) -> None:
    """coreutils before 8.30: `sha256sum` rejects -z as GNU coreutils 8.28 did."""
    if target is None:
        return
    path.unlink(missing_ok=True)
    real = _under(prefix, target)
    path.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do\n'
        "  case $a in\n"
        "    --) break ;;\n"
        '    --*) [ "$a" = --zero ] || continue ;;\n'
        "  esac\n"
        "  case $a in\n"
        "    --zero|-*z*)\n"
        "      echo \"sha256sum: invalid option -- 'z'\" >&2\n"
        "      echo \"Try 'sha256sum --help' for more information.\" >&2\n"
        "      exit 1 ;;\n"
        "  esac\n"
        "done\n"
        f'exec {real} "$@"\n'
    )
    path.chmod(0o755)
