"""Errors of the independent verifier (it imports nothing from the rest of custody)."""

from __future__ import annotations


class ManifestError(ValueError):
    """The founders' key manifest cannot be used: unreadable, of an unknown format or invalid."""


class ExportError(ValueError):
    """The address export cannot be read: malformed line, missing trailer, wrong count, ..."""


class DecodeError(ValueError):
    """A base58, bech32 or extended-key string does not decode."""


class LiabilitiesFileError(ValueError):
    """A proof of liabilities file cannot be read: bad header, line, value or tree shape."""


class FileRefused(ValueError):
    """A file refused before it is read: larger than its limit, or not a regular file or a
    pipe (a device such as /dev/zero, which has no size and never ends)."""


class SpillError(Exception):
    """The temporary files a large verification sorts its keys through could not be written
    (no such directory, a full disk) or came back changed: the verification has no answer
    (never a pass)."""
