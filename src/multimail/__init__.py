"""MultiMail: self-hosted email for AI agents, with graduated human oversight."""

from __future__ import annotations

__version__ = "0.1.0"

# The client reads __version__, so it is imported after it is set.
from multimail.client import (
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
