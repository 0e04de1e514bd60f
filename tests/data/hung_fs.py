#!/usr/bin/env python3
"""A FUSE file system whose folder listings never answer: a hung network mount, for the test
that the daemon's probes keep answering (tests/operate.rs).

    python3 tests/data/hung_fs.py MOUNTPOINT

Looking up the root answers at once (so the mount and inotify's watch succeed); opening a
folder for listing blocks until the process is killed. Needs fusepy and libfuse2.
"""

import errno
import stat
import sys
import threading
import time

from fuse import FUSE, FuseOSError, Operations


class Hung(Operations):
    def getattr(self, path, fh=None):
        if path != "/":
            raise FuseOSError(errno.ENOENT)
        now = time.time()
        return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_ctime": now, "st_mtime": now, "st_atime": now}

    def opendir(self, path):
        threading.Event().wait()  # never set: the listing hangs

    def readdir(self, path, fh):
        threading.Event().wait()


if __name__ == "__main__":
    FUSE(Hung(), sys.argv[1], foreground=True, nothreads=False, allow_other=True)
