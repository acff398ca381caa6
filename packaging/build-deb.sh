#!/bin/sh
# Build the conntrack-agent .deb from this source tree.
#
#   packaging/build-deb.sh [-o OUTDIR] [-v VERSION] [--lint]
#
#   -o OUTDIR    where the .deb, .buildinfo and .changes go (default: dist/)
#   -v VERSION   build as this Debian version (e.g. 0.1.0-2) by adding a changelog
#                entry in the build copy; the upgrade test uses it
#   --lint       then run lintian on the result; fail on an error or warning
#
# The tree is copied to a temporary directory (the files git tracks plus new
# ones it does not ignore, so no .venv or build output), packaging/debian/ is
# copied to debian/ there, and `dpkg-buildpackage -us -uc -b` runs in the copy:
# the working tree is never written. Build dependencies must be installed
# (dpkg-checkbuilddeps says which); DEB_BUILD_OPTIONS=nocheck skips the unit tests.
set -eu

# Debian's own tools and interpreter: not a pyenv, venv or /usr/local python on PATH.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV 2>/dev/null || true

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$root/dist
version=
lint=no

while [ $# -gt 0 ]; do
	case "$1" in
	-o|--output) out=$2; shift 2 ;;
	-v|--version) version=$2; shift 2 ;;
	--lint) lint=yes; shift ;;
	-h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "build-deb.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
	esac
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/conntrack-agent-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
src=$work/conntrack-agent

# --- a clean copy of the tree
"$here/copy-tree.sh" "$root" "$src"
rm -rf "$src/debian"
cp -a "$root/packaging/debian" "$src/debian"

# --- an optional version override (a changelog entry on top, in the copy only)
if [ -n "$version" ]; then
	trailer=$(sed -n 's/^ -- \(.*>\)  .*$/\1/p' "$src/debian/changelog" | head -n 1)
	{
		printf 'conntrack-agent (%s) unstable; urgency=medium\n\n' "$version"
		printf '  * Rebuild as %s (packaging/build-deb.sh --version).\n\n' "$version"
		printf ' -- %s  %s\n\n' "$trailer" "$(LC_ALL=C date -R)"
		cat "$src/debian/changelog"
	} >"$src/debian/changelog.new"
	mv "$src/debian/changelog.new" "$src/debian/changelog"
fi

# --- build
(cd "$src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1 || {
	tail -n 60 "$work/build.log" >&2
	echo "build-deb.sh: dpkg-buildpackage failed (log above)" >&2
	exit 1
}
version=$(cd "$src" && dpkg-parsechangelog -S Version)
for f in "$work"/conntrack-agent_"$version"_*; do
	cp "$f" "$out/"
done
cp "$work/build.log" "$out/conntrack-agent_${version}_build.log"
deb=$out/conntrack-agent_${version}_all.deb
echo "$deb"

if [ "$lint" = yes ]; then
	# The .changes covers the .deb and the .buildinfo. Overrides (with their
	# reasons) are in packaging/debian/conntrack-agent.lintian-overrides.
	lintian --fail-on error,warning --info --display-info \
		"$out/conntrack-agent_${version}_$(dpkg --print-architecture).changes"
fi
