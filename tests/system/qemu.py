"""Boot a whole Debian 12 node under qemu, with Debian's own kernel.

Why a VM: a container runs on the host's kernel, and the hosts here run 6.18
with nf_conntrack built in, so "nf_conntrack is a module nobody loads at boot",
the case the agent must handle on a stock Debian 12 node (6.1, nf_conntrack=m),
cannot happen in one. This boots Debian 12's linux-image-amd64 instead.

The image: debootstrap (minbase) with the kernel, systemd, udev, kmod and what
the agent's .deb depends on, so `dpkg -i` works inside without a network.
It is built once and cached under nspawn.CACHE_DIR as vm-SUITE-KEY/ (a raw ext4
image made with `mkfs.ext4 -d`, no loop mount, plus the kernel and initrd
copied out of /boot), keyed like nspawn.py's image cache on the suite, mirror
and package list, and on this file's image recipe (VM_SETUP): changing either
builds a new one. The debootstrapped tree is deleted once the image exists.

A run: qemu-system-x86_64 with TCG (these machines have no usable KVM;
CONNTRACK_AGENT_TEST_VM_ACCEL=kvm overrides), 1 GiB, no network (-nic none),
the root disk on virtio, and a 9p share mounted at /share in the guest:

- share/run.sh is the caller's script. ctatest-run.service runs it after
  multi-user.target, its stdout and stderr to share/out/output.txt and its exit
  status to share/out/exit-code, then powers the VM off.
- share/root/... is copied over the guest's / early in boot, after
  systemd-modules-load.service (which loads the 9p modules) and before
  systemd-sysctl.service reads /etc/sysctl.d (ctatest-stage.service): how a
  test puts an admin's sysctl.d file on the node *before* it boots.
- anything else the caller passes lands under /share as named.

run_in_vm() boots once with -snapshot: the cached image never changes. VM
boots the same image several times on a qcow2 overlay of its own, so a first
boot can install the .deb and a second boot show what happens from boot on.

Measured here (2 cores shared with other work, TCG, 2 vCPUs): run.sh starts
41-118 s after the kernel (uptime), qemu start to poweroff 50-160 s, the
spread following the host's load average (3.6-7); the kernel and initramfs take
~25 s of that. One vCPU was no faster. KVM is not usable on these machines (a
-accel kvm guest printed nothing). tests/system/test_boot_vm.py prints its numbers.

Building the image: debootstrap and mkfs, 225-464 s here; ~1.4 GB sparse
(~800 MB on disk). The two newest images are kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nspawn  # noqa: E402

HarnessError = nspawn.HarnessError
SUITE = nspawn.SUITE
MIRROR = nspawn.MIRROR
CACHE_DIR = nspawn.CACHE_DIR
RUN_DIR = nspawn.RUN_DIR

# A Debian 12 node: Debian's kernel (a module nf_conntrack, as the agent meets it),
# systemd as init, udev (which sees the module's uevent), kmod (modprobe, lsmod).
# Then what the agent's .deb needs at run time, so `dpkg -i` works offline: python3
# and python3-structlog (Depends), procps (the unit's ExecReload), python3-gi,
# python3-pydbus and dbus (Recommends: the D-Bus API). iproute2, nftables and
# conntrack let a test make traffic and look at the table inside.
PACKAGES = ("linux-image-amd64", "systemd", "systemd-sysv", "udev", "kmod", "dbus", "procps", "util-linux",
            "python3", "python3-structlog", "python3-gi", "python3-pydbus", "iproute2", "nftables", "conntrack")
REQUIRED_TOOLS = ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debootstrap", "chroot")
MEMORY_MB = 1024
# A 2-CPU node, on two host threads (multi-threaded TCG). One vCPU booted no faster here
# (4 alternating boots, 41-67 s either way); CONNTRACK_AGENT_TEST_VM_CPUS overrides.
CPUS = int(os.environ.get("CONNTRACK_AGENT_TEST_VM_CPUS", "2"))
KERNEL_CMDLINE = ("root=/dev/vda rw console=ttyS0 panic=-1 quiet loglevel=4 "
                  "systemd.show_status=error net.ifnames=0")

# --- what is written into the image (part of its cache key) -----------------------
# A fixed machine id: every boot of a -snapshot image would otherwise be a "first
# boot" (ConditionFirstBoot units, a new id each time).
MACHINE_ID = "c7a0b007c7a0b007c7a0b007c7a0b007"
STAGE_UNIT = """\
[Unit]
Description=conntrack-agent tests: mount /share, copy /share/root over /
DefaultDependencies=no
# Before the units that read /etc/sysctl.d and /etc/modules-load.d at boot, so files a
# test stages there are on the node when they run. The 9p modules come from
# /etc/modules-load.d/ctatest-9p.conf, loaded by systemd-modules-load.service first.
After=systemd-modules-load.service
Before=systemd-sysctl.service sysinit.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'mkdir -p /share && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /share && mkdir -p /share/out && if [ -d /share/root ]; then cp -a /share/root/. /; fi'

[Install]
WantedBy=sysinit.target
"""
RUN_UNIT = """\
[Unit]
Description=conntrack-agent tests: run /share/run.sh, then power off
After=multi-user.target ctatest-stage.service
Requires=ctatest-stage.service
# Power off whatever happens, so the host never waits for its timeout on a guest error.
# -force: no orderly stop of every unit (seconds under TCG); the disk is a throw-away
# snapshot or overlay, and 9p writes reach the host synchronously.
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
TimeoutStartSec=infinity
ExecStart=/bin/sh -c 'cd /share && /bin/bash /share/run.sh >/share/out/output.txt 2>&1; echo $? >/share/out/exit-code.tmp; sync; mv /share/out/exit-code.tmp /share/out/exit-code'

[Install]
WantedBy=multi-user.target
"""
VM_SETUP = {
    "etc/hostname": "ctatest-vm\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 ctatest-vm\n::1 localhost ip6-localhost ip6-loopback\n",
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "etc/machine-id": MACHINE_ID + "\n",
    "etc/modules-load.d/ctatest-9p.conf": "9pnet_virtio\n9p\n",
    # A small initrd: unpacking Debian's default one (MODULES=most, 35 MB) took ~9 s under
    # TCG. This one holds what mounts the root (and their dependencies, which
    # initramfs-tools adds itself).
    "etc/initramfs-tools/conf.d/ctatest.conf": "MODULES=list\n",
    "etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\next4\n",
    "etc/systemd/system/ctatest-stage.service": STAGE_UNIT,
    "etc/systemd/system/ctatest-run.service": RUN_UNIT,
}
ENABLE = {"ctatest-stage.service": "sysinit.target.wants", "ctatest-run.service": "multi-user.target.wants"}
# No login prompts on the console the harness reads; nothing else is changed from a stock node.
MASK = ("serial-getty@ttyS0.service", "getty@tty1.service")


def missing_tools() -> list:
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


def accel() -> str:
    return os.environ.get("CONNTRACK_AGENT_TEST_VM_ACCEL", "tcg")


def image_key(packages: Sequence[str] = PACKAGES) -> str:
    text = json.dumps({"suite": SUITE, "mirror": MIRROR, "variant": "minbase", "packages": sorted(set(packages)),
                       "setup": VM_SETUP, "enable": ENABLE, "mask": MASK}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Image:
    """A cached VM image: the disk, the kernel and the initrd it boots."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.disk = directory / "disk.raw"
        self.kernel = directory / "vmlinuz"
        self.initrd = directory / "initrd.img"
        info = json.loads((directory / "complete").read_text()) if (directory / "complete").exists() else {}
        self.kernel_version = info.get("kernel", "")


def ensure_vm_image(packages: Sequence[str] = PACKAGES) -> Image:
    """The cached image for this package list and recipe, built on first use."""
    directory = CACHE_DIR / ("vm-%s-%s" % (SUITE, image_key(packages)))
    if (directory / "complete").exists():
        return Image(directory)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "vm-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits for the first build
        if (directory / "complete").exists():
            return Image(directory)
        building = directory.with_name(directory.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)
        building.mkdir(parents=True)
        try:
            kernel = _build(building, sorted(set(packages)))
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        building.rename(directory)
        (directory / "complete").write_text(json.dumps({"packages": sorted(set(packages)), "kernel": kernel,
                                                         "built": time.time()}))
    _prune(keep=directory)
    return Image(directory)


def _build(out: Path, packages: Sequence[str]) -> str:
    root = out / "root"
    started = time.monotonic()
    nspawn._run(["debootstrap", "--variant=minbase", "--include=" + ",".join(packages), SUITE, str(root), MIRROR],
                timeout=2400)
    for rel, text in VM_SETUP.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.write_text(text)
    units = root / "etc/systemd/system"
    for unit, wants in ENABLE.items():
        (units / wants).mkdir(parents=True, exist_ok=True)
        link = units / wants / unit
        if not link.is_symlink():
            link.symlink_to("/etc/systemd/system/" + unit)
    for unit in MASK:
        link = units / unit
        if not link.is_symlink():
            link.symlink_to("/dev/null")
    nspawn._run(["chroot", str(root), "update-initramfs", "-u", "-k", "all"], timeout=900)
    # The packages' .debs are in the image's apt cache: not needed to boot, ~25% of the size.
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)

    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise HarnessError("expected one kernel in the image's /boot, found %s" % kernels)
    version = kernels[0].name[len("vmlinuz-"):]
    initrd = root / "boot" / ("initrd.img-" + version)
    if not initrd.exists():
        raise HarnessError("the image has no initrd for %s (update-initramfs failed in debootstrap?)" % version)
    shutil.copyfile(kernels[0], out / "vmlinuz")
    shutil.copyfile(initrd, out / "initrd.img")

    used = int(nspawn._run(["du", "-sxb", str(root)]).stdout.split()[0])
    size_mb = used * 13 // 10 // 2**20 + 512  # room for the .deb, logs and a test's files
    nspawn._run(["mkfs.ext4", "-q", "-F", "-L", "ctatest-root", "-d", str(root), str(out / "disk.raw"),
                 "%dM" % size_mb], timeout=900)
    shutil.rmtree(root)
    sys.stderr.write("qemu.py: built the VM image (kernel %s, %d MB) in %.0f s\n"
                     % (version, size_mb, time.monotonic() - started))
    return version


def _prune(keep: Path, keep_count: int = 2) -> None:
    """Drop older VM images (a GB or more each), keeping the newest few."""
    images = sorted((p for p in CACHE_DIR.glob("vm-%s-*" % SUITE) if p.is_dir() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[keep_count - 1:]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ running


class VM:
    """Boots of one image that keep their disk changes between boots (a qcow2 overlay
    of their own); use as a context manager, everything is removed on exit."""

    def __init__(self, image: Optional[Image] = None, snapshot: bool = False) -> None:
        self.image = image or ensure_vm_image()
        self.dir = RUN_DIR / ("vm-%d-%s" % (os.getpid(), secrets.token_hex(3)))
        self.snapshot = snapshot
        self.console = self.dir / "console.log"
        self.overlay = self.dir / "disk.qcow2"
        self.boots = 0
        self.last_seconds = 0.0

    def __enter__(self) -> "VM":
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        if not self.snapshot:
            nspawn._run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image.disk),
                         str(self.overlay)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def argv(self, share: Path) -> list:
        if self.snapshot:
            drive = "file=%s,format=raw,if=virtio,snapshot=on" % self.image.disk
        else:
            drive = "file=%s,format=qcow2,if=virtio" % self.overlay
        # -nodefaults: no VGA, floppy, CD-ROM or NIC, whose drivers udev would load (drm alone
        # took seconds under TCG); the default CPU model, so no crypto modules for CPU features.
        return ["qemu-system-x86_64", "-accel", accel() + (",thread=multi" if accel() == "tcg" else ""),
                "-nodefaults", "-smp", str(CPUS), "-m", str(MEMORY_MB),
                "-display", "none", "-serial", "file:%s" % self.console, "-no-reboot",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", KERNEL_CMDLINE,
                "-drive", drive, "-nic", "none",
                "-virtfs", "local,path=%s,mount_tag=share,security_model=none,id=share" % share]

    def boot(self, script: str, files: Optional[Dict[str, Path]] = None, timeout: float = 240) -> Tuple[int, str]:
        """Boot, run `script` (bash) after multi-user.target, power off: (exit status, output).

        `files` maps a path under /share in the guest to a host file or directory;
        paths under "root/" are copied over the guest's / before systemd-sysctl runs.
        Raises HarnessError when the guest does not finish within `timeout` seconds
        (the console's tail says why)."""
        share = self.dir / ("share-%d" % self.boots)
        self.boots += 1
        shutil.rmtree(share, ignore_errors=True)
        (share / "out").mkdir(parents=True)
        (share / "run.sh").write_text(script)
        for name, source in (files or {}).items():
            target = share / name
            if os.path.isabs(name) or ".." in Path(name).parts or name in ("run.sh", "out") \
                    or Path(name).parts[0] == "out":
                raise ValueError("not a file name under /share: %r" % name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(source).is_dir():
                shutil.copytree(source, target, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, target)
        started = time.monotonic()
        with open(self.dir / "qemu.log", "wb") as log:
            proc = subprocess.Popen(self.argv(share), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
                raise HarnessError("the VM did not finish within %.0f s:\n%s" % (timeout, self.console_text()))
        self.last_seconds = time.monotonic() - started
        code_file = share / "out" / "exit-code"
        if not code_file.exists():
            raise HarnessError("qemu exited (%s) after %.0f s without the script's exit code:\n%s\n%s" % (
                proc.returncode, self.last_seconds, self._read(self.dir / "qemu.log"), self.console_text()))
        return int(code_file.read_text().strip()), self._read(share / "out" / "output.txt")

    @staticmethod
    def _read(path: Path, tail: int = 0) -> str:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-tail:] if tail else text

    def console_text(self, tail: int = 6000) -> str:
        return self._read(self.console, tail)


def run_in_vm(script: str, files: Optional[Dict[str, Path]] = None, timeout: float = 240) -> Tuple[int, str]:
    """One boot of the cached image (-snapshot: nothing it writes is kept)."""
    with VM(snapshot=True) as vm:
        return vm.boot(script, files, timeout)
