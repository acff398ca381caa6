"""Build the .deb and the RPMs once per source tree, for the package tests.

packaging/build-deb.sh and packaging/build-rpm.sh do the work; this caches their
output under CACHE, keyed on the content of every file they would copy (the
files git tracks plus untracked ones it does not ignore) and the version asked
for, so the lint, RPM and install tests of one run, and reruns on an unchanged
tree, share one build. A changed file means a new build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CONNTRACK_AGENT_PACKAGE_CACHE", "/var/tmp/conntrack-agent-tests/packages"))
# Debian's tools and interpreter, whatever the caller's PATH holds (a venv, pyenv).
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}

# The version the upgrade test (and the version-override test) build: above the changelog's.
UPGRADE_SUFFIX = "+upgradetest1"

DEB_TOOLS = ("dpkg-buildpackage", "dh", "lintian", "dpkg-deb")
RPM_TOOLS = ("rpmbuild", "rpm", "rpmlint", "rpmspec")


class BuildError(RuntimeError):
    pass


def missing(tools) -> List[str]:
    return [t for t in tools if shutil.which(t, path=ENV["PATH"]) is None]


def source_files(repo: Path = REPO) -> List[str]:
    proc = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True, check=False)
    if proc.returncode == 0:
        names = [n for n in proc.stdout.decode().split("\0") if n]
    else:
        skip = {".git", ".venv", "dist", "build", "__pycache__", ".pytest_cache"}
        names = [str(p.relative_to(repo)) for p in repo.rglob("*")
                 if p.is_file() and not skip.intersection(p.relative_to(repo).parts)
                 and not any(part.endswith(".egg-info") for part in p.parts)]
    return sorted(n for n in names if (repo / n).is_file())


def tree_key(*extra: str) -> str:
    digest = hashlib.sha256()
    for name in source_files():
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256((REPO / name).read_bytes()).digest())
    for item in extra:
        digest.update(b"\0" + item.encode())
    return digest.hexdigest()[:20]


def _cached_build(kind: str, argv: List[str], key_extra: List[str], timeout: float = 900) -> Path:
    """Run a build script into a cache directory keyed on the tree; return that directory."""
    out = CACHE / ("%s-%s" % (kind, tree_key(kind, *key_extra)))
    if (out / "complete").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ("%s.lock" % kind), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "complete").exists():
            return out
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        proc = subprocess.run(argv + ["-o", str(out)], capture_output=True, text=True, env=ENV, timeout=timeout)
        if proc.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            raise BuildError("%s failed (%d):\n%s\n%s" % (" ".join(argv), proc.returncode,
                                                          proc.stdout[-4000:], proc.stderr[-4000:]))
        (out / "complete").write_text(proc.stdout)
    _prune(kind, keep=out)
    return out


def _prune(kind: str, keep: Path, keep_count: int = 4) -> None:
    """Drop old builds of this kind, keeping the newest few."""
    builds = sorted((p for p in CACHE.glob(kind + "-*") if p.is_dir() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[keep_count - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def changelog_version() -> str:
    proc = subprocess.run(["dpkg-parsechangelog", "-l", str(REPO / "packaging/debian/changelog"), "-S", "Version"],
                          capture_output=True, text=True, env=ENV, check=True)
    return proc.stdout.strip()


def build_deb(version: Optional[str] = None) -> Path:
    """The .deb built from the tree (as `version` when given)."""
    argv = [str(REPO / "packaging/build-deb.sh")] + (["-v", version] if version else [])
    out = _cached_build("deb", argv, [version or ""])
    debs = sorted(out.glob("conntrack-agent_*_all.deb"))
    if len(debs) != 1:
        raise BuildError("expected one .deb in %s, found %s" % (out, debs))
    return debs[0]


def build_rpms() -> Dict[str, Path]:
    """{"srpm": ..., "rpm": ...} built from the tree."""
    out = _cached_build("rpm", [str(REPO / "packaging/build-rpm.sh")], [])
    srpm = sorted(out.glob("conntrack-agent-*.src.rpm"))
    rpm = sorted(out.glob("conntrack-agent-*.noarch.rpm"))
    if len(srpm) != 1 or len(rpm) != 1:
        raise BuildError("expected one source and one noarch RPM in %s" % out)
    return {"srpm": srpm[0], "rpm": rpm[0]}


def run(argv: List[str], check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and proc.returncode != 0:
        raise BuildError("%s failed (%d):\n%s%s" % (" ".join(argv), proc.returncode, proc.stdout, proc.stderr))
    return proc
