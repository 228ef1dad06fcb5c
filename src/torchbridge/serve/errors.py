"""How a request's failure becomes an HTTP answer: OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` with the status that fits it."""

from typing import Any

from torchbridge.serve.batching import QueueFull

__all__ = ["APIError", "error_body", "shed", "validation_error_body"]


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def shed(err: QueueFull) -> APIError:
    """A full queue: 429 with the wait the queue estimated."""
    return APIError(429, str(err), type_="rate_limit_error",
                    headers={"Retry-After": str(err.retry_after_s)})


def validation_error_body(errors: list[dict]) -> dict:
    """FastAPI's validation errors as one message naming every bad field (422)."""
    problems = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        problems.append(f"{loc}: {e.get('msg')}")
    first = errors[0] if errors else {}
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    return error_body("invalid request body: " + "; ".join(problems), "invalid_request_error",
                      param)
