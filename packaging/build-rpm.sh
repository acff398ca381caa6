#!/bin/sh
# Build the conntrack-agent source and noarch RPMs from this tree with rpmbuild.
#
#   packaging/build-rpm.sh [-o OUTDIR] [--lint]
#
#   -o OUTDIR   where the .src.rpm and .noarch.rpm go (default: dist/)
#   --lint      then run rpmlint on the spec and both packages; fail on an error
#
# Meant for Fedora/RHEL, where it is plain `rpmbuild -ba`. On Debian (Debian's
# rpm package) it also works, to check the spec in CI, with two concessions:
#   - --nodeps: the BuildRequires are Fedora package names dpkg cannot satisfy
#     (python3-devel, pyproject-rpm-macros, systemd-rpm-macros, ...). What the
#     build really needs on Debian: rpm, python3-build, python3-installer,
#     python3-setuptools, python3-wheel, python3-pytest, python3-structlog.
#   - packaging/rpm/macros.debian stands in for Fedora's macro packages.
# The .src.rpm is what to rebuild on the target (packaging/README.md); the noarch
# RPM built on Debian has Debian's Python version in its paths and is for
# inspection (rpm -qp), not for installing.
set -eu

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV 2>/dev/null || true

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
spec=$here/rpm/conntrack-agent.spec
out=$root/dist
lint=no

while [ $# -gt 0 ]; do
	case "$1" in
	-o|--output) out=$2; shift 2 ;;
	--lint) lint=yes; shift ;;
	-h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "build-rpm.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
	esac
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
top=$(mktemp -d "${TMPDIR:-/tmp}/conntrack-agent-rpm.XXXXXX")
trap 'rm -rf "$top"' EXIT INT TERM
mkdir -p "$top/SOURCES" "$top/SPECS" "$top/BUILD" "$top/RPMS" "$top/SRPMS"

name=conntrack-agent
version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec" | head -n 1)

# --- Source0: the tree (tracked files and new ones git does not ignore)
stage=$top/stage/$name-$version
"$here/copy-tree.sh" "$root" "$stage"
tar -C "$top/stage" --owner=0 --group=0 --sort=name -czf "$top/SOURCES/$name-$version.tar.gz" "$name-$version"
# --- Source1
cp "$root/systemd/sysusers.d/$name.conf" "$top/SOURCES/$name.sysusers"
cp "$spec" "$top/SPECS/"

set -- --define "_topdir $top"
if [ -f /etc/debian_version ]; then
	set -- "$@" --nodeps --load "$here/rpm/macros.debian"
fi
rpmbuild -ba "$@" "$top/SPECS/$name.spec" >"$top/build.log" 2>&1 || {
	tail -n 60 "$top/build.log" >&2
	echo "build-rpm.sh: rpmbuild failed (log above)" >&2
	exit 1
}
cp "$top"/SRPMS/*.src.rpm "$top"/RPMS/noarch/*.noarch.rpm "$out/"
cp "$top/build.log" "$out/$name-$version-rpmbuild.log"
ls "$out"/$name-$version-*.src.rpm "$out"/$name-$version-*.noarch.rpm

if [ "$lint" = yes ]; then
	# Fedora's settings, and each filtered message with its reason: packaging/rpm/rpmlint.toml
	rpmlint -c "$here/rpm/rpmlint.toml" "$spec" "$out"/$name-$version-*.src.rpm "$out"/$name-$version-*.noarch.rpm
fi
