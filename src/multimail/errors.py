"""MultiMail's exceptions: one root, each also the natural built-in, each with a stable ``code``.

The tree::

    MultimailError
    ├── InvalidInput (ValueError)              400/422  bad_request / validation_error / ...
    ├── AuthenticationFailed (PermissionError) 401      unauthorized
    ├── Forbidden (PermissionError)            403      forbidden / insufficient_scope / ...
    ├── NotFound (LookupError)                 404      not_found
    ├── Conflict (RuntimeError)                409      conflict / ...
    ├── TooLarge (ValueError)                  413      payload_too_large
    ├── RateLimited (RuntimeError)             429      rate_limited / send_cap_exceeded / ...
    ├── ApprovalRequired (RuntimeError)        202      approval_required (the two-step flow)
    ├── Unavailable (RuntimeError)             503      unavailable
    └── DeliveryError
        ├── TemporaryDeliveryError             retry later (4xx, connection errors)
        └── PermanentDeliveryError             give up (5xx): bounce

One place (``multimail.api.errors``) maps these to HTTP statuses; services raise them and
never know about HTTP.
"""

from __future__ import annotations

from typing import Any


class MultimailError(Exception):
    """Root of every error MultiMail raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.context: dict[str, Any] = context

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        body.update(self.context)
        return body


class InvalidInput(MultimailError, ValueError):
    status = 422
    code = "validation_error"


class MalformedRequest(InvalidInput):
    status = 400
    code = "bad_request"


class AuthenticationFailed(MultimailError, PermissionError):
    status = 401
    code = "unauthorized"


class Forbidden(MultimailError, PermissionError):
    status = 403
    code = "forbidden"


class NotFound(MultimailError, LookupError):
    status = 404
    code = "not_found"


class Conflict(MultimailError, RuntimeError):
    status = 409
    code = "conflict"


class TooLarge(MultimailError, ValueError):
    status = 413
    code = "payload_too_large"


class RateLimited(MultimailError, RuntimeError):
    status = 429
    code = "rate_limited"

    def __init__(
        self, message: str, *, retry_after: int, code: str | None = None, **context: Any
    ) -> None:
        super().__init__(message, code=code, retry_after=retry_after, **context)
        self.retry_after = retry_after


class ApprovalRequired(MultimailError, RuntimeError):
    """Not a failure: the action needs the operator's one-time code, which was just mailed."""

    status = 202
    code = "approval_required"


class Unavailable(MultimailError, RuntimeError):
    status = 503
    code = "unavailable"


class DeliveryError(MultimailError):
    """Handing a message to the next SMTP hop failed."""

    def __init__(
        self,
        message: str,
        *,
        smtp_code: int | None = None,
        host: str | None = None,
        code: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, code=code, **context)
        self.smtp_code = smtp_code
        self.host = host


class TemporaryDeliveryError(DeliveryError):
    code = "delivery_deferred"


class PermanentDeliveryError(DeliveryError):
    code = "delivery_failed"
