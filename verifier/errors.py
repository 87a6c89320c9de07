"""Typed errors of the verifier. Only the CLI turns them into exit codes."""


class VerifyError(Exception):
    """Base class; an infrastructure failure unless a subclass says otherwise."""

    exit_code = 3


class InputError(VerifyError):
    """Bad user input: a missing or wrong artifact, a malformed option, a QEMU that is too old."""

    exit_code = 2


class QemuError(VerifyError):
    """A QEMU process failed to start, crashed or stopped answering."""


class MigrationError(VerifyError):
    """The migration failed or did not converge in time."""


class CaptureError(VerifyError):
    """Guest RAM could not be captured, or the capture is inconsistent."""
