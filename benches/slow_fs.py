#!/usr/bin/env python3
"""A FUSE passthrough that answers every request after a fixed delay: a network file system's
round trip (NFS over a LAN answers a GETATTR or LOOKUP in a few tenths of a millisecond, over a
WAN or a busy filer in milliseconds), for measuring what watching a shared inbox costs
(benches/RESULTS.md, "Fleet").

    python3 benches/slow_fs.py SOURCE MOUNTPOINT [DELAY_MS]

Reads and writes go to SOURCE. Needs fusepy and libfuse2 (.ci/run installs both); unmount with
`umount MOUNTPOINT` or by killing the process.
"""

import errno
import os
import sys
import time

from fuse import FUSE, FuseOSError, Operations


class Slow(Operations):
    def __init__(self, root, delay_s):
        self.root = root
        self.delay_s = delay_s

    def _path(self, path):
        time.sleep(self.delay_s)
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._path(path))
        except OSError as e:
            raise FuseOSError(e.errno)
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime", "st_ctime")
        out = {k: getattr(st, k) for k in keys}
        out["st_mtime_ns"] = st.st_mtime_ns
        return out

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def open(self, path, flags):
        return os.open(self._path(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, size, offset, fh):
        time.sleep(self.delay_s)
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        time.sleep(self.delay_s)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        os.truncate(self._path(path), length)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)

    def unlink(self, path):
        os.unlink(self._path(path))

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))

    def utimens(self, path, times=None):
        os.utime(self._path(path), times)

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def access(self, path, mode):
        if not os.access(self._path(path), mode):
            raise FuseOSError(errno.EACCES)


if __name__ == "__main__":
    source, mount = sys.argv[1], sys.argv[2]
    delay_ms = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    # Threads: several clients (daemons) wait on the "network" at once, as with a real filer.
    FUSE(Slow(os.path.abspath(source), delay_ms / 1000.0), mount, foreground=True, nothreads=False, allow_other=True)
