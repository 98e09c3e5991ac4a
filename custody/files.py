"""Files given to custody, read within a size limit that is checked before reading; and the
small files custody writes, written atomically (temporary file, fsync, rename).

Every file input (key files, passphrase and PIN files, manifests, PSBTs, liabilities and
proofs, webhook secrets, PGP keys, a node's cookie and state) is read through
:func:`read_limited`. A regular file larger than its limit is refused from its size alone,
before a byte is read. A pipe (a shell's ``<(...)``, ``/dev/stdin`` fed by a pipe) is read
up to the limit and refused beyond it. Anything else, a device such as ``/dev/zero`` or
``/dev/urandom``, a terminal, a socket, is refused at once: it has no size to check and may
never end. A refusal is an InputError (exit code 2) that names the file, the limit and why.

JSON Lines files custody appends to (the audit log's witness, the offline signer's journal)
get one whole line at a time, under an exclusive lock, fsynced; a last line torn by a crash is
cut off before the next append.

``custody.verify`` keeps its own copy of these checks: it imports nothing of ours.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from custody.errors import InputError, StorageError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

KEY_FILE_MAX = 1 * MIB
"""An encrypted founder or employee key file (a few hundred bytes of JSON)."""
SECRET_FILE_MAX = 64 * KIB
"""A file holding a secret on its first line: passphrase, PIN, webhook secret, SMTP password."""
MANIFEST_MAX = 1 * MIB
"""The founders' manifest (short JSON; custody.verify.manifest.MAX_BYTES is the same)."""
PSBT_MAX = 64 * MIB
"""A withdrawal PSBT, binary or base64 (every input carries its whole previous transaction)."""
PGP_KEY_MAX = 1 * MIB
"""An armored OpenPGP public key."""
LIABILITIES_MAX = 256 * MIB
"""A published liabilities tree, or a proofs file (one account's proof, or every account's)."""
NODE_FILE_MAX = 64 * KIB
"""A node's RPC cookie, or the state file ``custody node start`` writes."""
EXPORT_MAX = 16 * GIB
"""An address export (JSON Lines, streamed; custody.verify.export checks each line's length)."""

_CHUNK = 64 * KIB


def describe_size(limit: int) -> str:
    """``limit`` bytes in the largest whole unit (``64 KiB``, ``100 MiB``)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if limit >= size and limit % size == 0:
            return f"{limit // size} {unit}"
    return f"{limit} bytes"


def _too_large(what: str, path: Path, limit: int, size: int | None = None) -> InputError:
    have = f" ({size} bytes)" if size is not None else ""
    return InputError(f"{what} {path} is larger than {describe_size(limit)}{have}: refused unread")


def _not_a_file(what: str, path: Path, mode: int) -> InputError:
    kind = (
        "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a directory"
        if stat.S_ISDIR(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return InputError(f"{what} {path} is {kind}, not a file or a pipe: refused unread")


def _open(path: Path) -> tuple[int, os.stat_result]:
    """Open for reading without blocking on a FIFO or taking a terminal; fstat it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def check_size(path: Path, limit: int, what: str) -> None:
    """Refuse ``path`` unless it is a regular file of at most ``limit`` bytes, or a pipe
    (whose reader must then stop at ``limit`` itself).

    Raises InputError (exit 2) for a larger file or a device, directory or socket;
    OSError when it cannot be opened (callers keep their own messages for that).
    """
    fd, info = _open(Path(path))
    os.close(fd)
    if stat.S_ISREG(info.st_mode):
        if info.st_size > limit:
            raise _too_large(what, Path(path), limit, info.st_size)
    elif not stat.S_ISFIFO(info.st_mode):
        raise _not_a_file(what, Path(path), info.st_mode)


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """The bytes of file ``path``, at most ``limit`` of them (see the module's docstring).

    ``what`` names the file in messages ("passphrase file", "PSBT", ...). Raises InputError
    (exit 2) for a file larger than ``limit`` or one that is not a regular file or a pipe;
    OSError when it cannot be opened or read (callers keep their own messages for that).
    """
    path = Path(path)
    fd, info = _open(path)
    try:
        if stat.S_ISREG(info.st_mode):
            if info.st_size > limit:
                raise _too_large(what, path, limit, info.st_size)
        elif stat.S_ISFIFO(info.st_mode):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)  # wait for the writer's data
        else:
            raise _not_a_file(what, path, info.st_mode)
        chunks: list[bytes] = []
        total = 0
        while True:
            # A regular file may grow while it is read: never more than limit + 1 bytes.
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _too_large(what, path, limit)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_limited_text(path: Path, limit: int, what: str) -> str:
    """:func:`read_limited`, decoded as UTF-8. Raises InputError also for text that is not UTF-8."""
    data = read_limited(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text") from None


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """At most ``limit`` bytes of ``path`` (:func:`read_limited`, with its checks before
    reading). Raises FileNotFoundError (for the caller to word), InputError (exit 2) for a
    larger file, a device (``/dev/zero``), a directory, or a read error."""
    try:
        return read_limited(path, limit, what)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new file, never half
    of one, also across a crash. Raises StorageError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


TAIL_BYTES = 64 * 1024


def read_tail(fd: int, size: int, limit: int = TAIL_BYTES) -> bytes:
    """The last whole lines within ``limit`` bytes of an open file of ``size`` bytes."""
    start = max(0, size - limit)
    os.lseek(fd, start, os.SEEK_SET)
    data = b""
    while len(data) < size - start:
        chunk = os.read(fd, size - start - len(data))
        if not chunk:
            break
        data += chunk
    if start > 0:  # the first line read may be cut: it starts after the first newline
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    return data


class LockedLines:
    """A JSON Lines file held under its exclusive lock: ``data``, its whole lines as read (all of
    them, or the last ones), and :meth:`append`."""

    def __init__(self, fd: int, data: bytes) -> None:
        self.fd = fd
        self.data = data

    @property
    def last(self) -> bytes:
        return self.data.rstrip(b"\n").rsplit(b"\n", 1)[-1] if self.data.strip() else b""

    def append(self, line: bytes) -> None:
        """Append one whole line (ending in a newline), then fsync. A write that stops part of the
        way (a full disk writes what fits, then fails) is cut back off. Raises OSError."""
        start = os.fstat(self.fd).st_size
        rest = memoryview(line)
        try:
            while rest:
                rest = rest[os.write(self.fd, rest) :]
            os.fsync(self.fd)
        except OSError:
            with suppress(OSError):
                os.ftruncate(self.fd, start)
            raise


@contextmanager
def locked_lines(path: Path, whole: bool = False) -> Iterator[LockedLines]:
    """Open (or create) a JSON Lines file under an exclusive lock, cut off an unterminated last
    line (an append torn by a crash), and read its whole lines: all of them (``whole``) or
    those in the last TAIL_BYTES. Raises OSError for the caller to word."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = read_tail(fd, size, size if whole else TAIL_BYTES)
        if data and not data.endswith(b"\n"):
            os.ftruncate(fd, size - (len(data) - (data.rfind(b"\n") + 1)))
            data = data[: data.rfind(b"\n") + 1]
        yield LockedLines(fd, data)
    finally:
        os.close(fd)  # releases the lock
