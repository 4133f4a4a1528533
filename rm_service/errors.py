"""The service's errors: the ground floor's hierarchy (salmon.errors) with the ONE table that maps
them to HTTP status codes."""

from __future__ import annotations

from salmon.errors import SalmonError


class ServiceError(SalmonError):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


def error_body(status: int, type_: str, message: str, param: str | None = None) -> dict:
    """The one error body of every status (docs/contract.md#errors)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


class InvalidRequest(ServiceError):
    status, type = 422, "invalid_request"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status, type = 403, "forbidden"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class Conflict(ServiceError):
    status, type = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class Overloaded(ServiceError):
    status, type = 429, "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after_s)))})


class NotReady(ServiceError):
    status, type = 503, "not_ready"

    def __init__(self, message: str, retry_after_s: float = 2.0):
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after_s)))})


class ScoringFailed(ServiceError):
    """The model failed on valid input (e.g. out of memory): a server-side fault, not the client's."""

    status, type = 500, "scoring_failed"
