#!/bin/sh
# copy-tree.sh SRC DEST: copy a source tree for a package build.
#
# In a git checkout: the files git tracks and the new ones it does not ignore,
# as they are in the working tree (a tracked file deleted there is skipped), so
# no .venv, build output or caches. Elsewhere (an unpacked tarball): everything
# but those. Used by build-deb.sh and build-rpm.sh.
set -eu
src=$1
dest=$2
mkdir -p "$dest"
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	git -C "$src" ls-files -z --cached --others --exclude-standard |
		tar -C "$src" --null --files-from=- --ignore-failed-read -cf - 2>/dev/null |
		tar -C "$dest" -xf -
else
	tar -C "$src" --exclude=.git --exclude=.venv --exclude=dist --exclude=build \
		--exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache -cf - . |
		tar -C "$dest" -xf -
fi
