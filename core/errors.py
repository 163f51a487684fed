"""One root error for the project; each domain error carries the HTTP status the API maps it to."""

from __future__ import annotations


class ChurnError(Exception):
    """Root of every error this project raises on purpose."""

    http_status: int = 500


class ConfigError(ChurnError):
    """A setting is missing or invalid."""


class ServiceUnavailableError(ChurnError):
    """A backing service (Kafka, Redis, the model registry) cannot be reached."""

    http_status = 503


class StoreRefusedError(ServiceUnavailableError):
    """Redis answered but refused the command for a reason that lasts until someone acts: out
    of memory (OOM), a read-only replica (READONLY), a failed save (MISCONF), wrong or missing
    credentials (NOAUTH, WRONGPASS, NOPERM). `reason` is Redis' error code."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidInputError(ChurnError):
    """Input (a file, a request, an argument) is malformed; the message says where and why."""

    http_status = 422


class NotFoundError(ChurnError):
    """The thing asked for does not exist."""

    http_status = 404


class ModelRefusedError(ChurnError):
    """A registered model does not fit the running code (its feature list or spec version
    differs from the feature spec), so it must not serve."""

    http_status = 503
