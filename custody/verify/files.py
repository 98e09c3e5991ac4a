"""Opening the auditors' files within a size limit checked before reading (standard library only).

The same rules as ``custody.files``, kept here because the verifier imports nothing of ours:
a regular file larger than its limit, or anything that is neither a regular file nor a pipe
(``/dev/zero``, a terminal, a directory), is refused with FileRefused before a byte is read.
A pipe has no size: whoever reads it stops at the limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

from .errors import FileRefused

MANIFEST_MAX_BYTES = 1024 * 1024
"""A founders' manifest: a few founders' keys in JSON."""
EXPORT_MAX_BYTES = 16 * 1024**3
"""An address export (about 250 bytes an address: some 60 million addresses)."""
EXPORT_MAX_LINE = 64 * 1024
"""One line of an export: an address record is a few hundred bytes."""


def open_checked(path: str | Path, limit: int, what: str) -> IO[bytes]:
    """``path`` opened for binary reading once it passed the checks (the caller closes it).

    Raises FileRefused for a regular file above ``limit`` bytes or a file that is no
    regular file or pipe; OSError when it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode, size = os.fstat(fd).st_mode, os.fstat(fd).st_size
        if stat.S_ISREG(mode):
            if size > limit:
                raise FileRefused(f"{what} {path} is larger than {limit} bytes ({size} bytes): refused unread")
        elif stat.S_ISFIFO(mode):
            os.set_blocking(fd, True)  # wait for the writer's data
        else:
            raise FileRefused(f"{what} {path} is not a file or a pipe (a device or a directory?): refused unread")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_checked(path: str | Path, limit: int, what: str) -> bytes:
    """The whole of ``path``, at most ``limit`` bytes (see :func:`open_checked`)."""
    with open_checked(path, limit, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileRefused(f"{what} {path} is larger than {limit} bytes: refused")
    return data
