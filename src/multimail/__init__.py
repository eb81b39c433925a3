"""MultiMail: self-hosted email for AI agents, with graduated human oversight."""

from __future__ import annotations

__version__ = "0.1.0"

from multimail.client import (  # noqa: E402 - the client reads __version__ above
    APIConnectionError,
    AsyncMultimailClient,
    AuthenticationError,
    ConflictError,
    MultimailAPIError,
    MultimailClient,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ValidationError,
)

__all__ = [
    "APIConnectionError",
    "AsyncMultimailClient",
    "AuthenticationError",
    "ConflictError",
    "MultimailAPIError",
    "MultimailClient",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "ValidationError",
    "__version__",
]
