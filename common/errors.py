"""Errors that name the offending field, so the CLI and gRPC can report them clearly."""

from __future__ import annotations


class FieldError(ValueError):
    """A bad value in a named field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ConfigError(FieldError):
    """Bad engine or server configuration (refused at start)."""


class InvalidRequest(FieldError):
    """A bad request; the server answers INVALID_ARGUMENT and keeps serving."""
