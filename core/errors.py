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
