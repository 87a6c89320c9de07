"""Typed errors of the builder. Only the CLI turns them into exit codes."""


class BuildError(Exception):
    """Base class; an infrastructure failure unless a subclass says otherwise."""

    exit_code = 3


class BuildInputError(BuildError):
    """The user's input is wrong (bad option, bad file, wrong architecture)."""

    exit_code = 2


class ToolMissingError(BuildInputError):
    """A program the build needs (cross-compiler, make, gpgv) is not installed."""


class DownloadError(BuildError):
    """A download failed or the archive could not be reached."""


class IntegrityError(DownloadError):
    """A file's hash or signature does not match what the lock or the archive says."""


class CacheMissError(DownloadError):
    """--offline was given and a pinned file is not in the cache."""
