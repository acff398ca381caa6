"""inotify through libc (ctypes): the only module binding it (the stdlib has none
before Python 3.14). Namespace discovery watches /run/netns with it; the policy
watcher watches the policy's directories.
"""

from __future__ import annotations

import os
import struct
from typing import List, Tuple

IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_CLOSE_WRITE = 0x00000008
IN_ATTRIB = 0x00000004
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("=iIII")   # struct inotify_event: wd, mask, cookie, len (then name)


class Inotify:
    """inotify through libc (ctypes): the stdlib has no binding before Python 3.14."""

    def __init__(self) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self._init1 = libc.inotify_init1
        self._init1.argtypes = [ctypes.c_int]
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self._errno = ctypes.get_errno
        fd = self._init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = self._errno()
            raise OSError(err, "inotify_init1: %s" % os.strerror(err))
        self.fd = fd

    def add(self, path: str, mask: int) -> int:
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = self._errno()
            raise OSError(err, os.strerror(err), path)
        return wd

    def rm(self, wd: int) -> None:
        self._rm(self.fd, wd)   # EINVAL when the kernel already dropped it: fine

    def read(self) -> List[Tuple[int, int, str]]:
        """Every queued event as (wd, mask, name); [] when none."""
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off + 16 <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, off)
                raw = data[off + 16:off + 16 + length].split(b"\0", 1)[0]
                out.append((wd, mask, os.fsdecode(raw)))
                off += 16 + length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
