"""Errors raised by the detector core.

Every error names the column, row or field at fault so that a batch job can
quarantine what it cannot score and an HTTP layer can answer with a 4xx.
"""

from __future__ import annotations


class UnusualError(Exception):
    """Base class of every error this library raises on purpose."""


class SchemaError(UnusualError, ValueError):
    """A batch does not match the feature schema the model was fit on.

    ``column`` names the offending column (``None`` when the problem is the
    table as a whole, e.g. an empty batch) and ``rows`` holds the positions of
    the offending rows where that is meaningful.
    """

    def __init__(self, message: str, column: str | None = None, rows: list[int] | None = None):
        super().__init__(message)
        self.column = column
        self.rows = rows or []


class BundleError(UnusualError):
    """A checkpoint bundle is missing, corrupt, truncated or inconsistent."""


class BundleVersionError(BundleError):
    """A checkpoint bundle was written by a newer, incompatible format version."""


class NotFittedError(UnusualError, RuntimeError):
    """A method that needs a fitted detector was called before ``fit``."""


class ScoreError(UnusualError, ValueError):
    """The model's score of a row is not finite. Scaled inputs are clipped, so this is not expected
    from any input the schema accepts; it names the first such row (``rows`` holds them all)."""

    def __init__(self, message: str, rows: list[int] | None = None):
        super().__init__(message)
        self.rows = rows or []


CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an "
    "S3-compatible store such as MinIO (README: Object storage)"
)


def storage_problem(e: BaseException, uri: str, doing: str) -> str | None:
    """One line for an object-storage error a user can fix (no credentials, access denied), naming
    the URI and what to set; None for any other error. By class name: botocore is optional."""
    names = {k.__name__ for k in type(e).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return f"no object-storage credentials {doing} {uri}: {CREDENTIALS}"
    denied = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")
    if isinstance(e, PermissionError) or ("ClientError" in names and any(d in str(e) for d in denied)):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"access denied {doing} {uri}: check the credentials ({first})"
    return None
