"""Errors in OpenAI's JSON shape, with the status codes OpenAI clients branch on.

Every error answer is ``{"error": {"message", "type", "param", "code"}}`` as vLLM's
``ErrorResponse`` writes it (``type`` an exception-like name, ``code`` the HTTP status):

====  ==========================  ==================================================
400   BadRequestError             invalid input; ``param`` names the parameter
401   AuthenticationError         ``gateway.api_keys`` is set and the Bearer key is not one of them
404   NotFoundError               the model no live worker serves (the message lists those served)
410   CancelledError              the job was cancelled (``vqueue cancel``, a purge, a client gone)
429   RateLimitError              the model's backlog is at ``queue.max_backlog``; ``Retry-After``
500   InternalServerError         the engine failed on the job (``EngineError``, ``Quarantined``)
503   ServiceUnavailableError     Redis cannot be reached
504   GatewayTimeoutError         the job's deadline or the request's timeout passed; names the job id
====  ==========================  ==================================================
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An answer other than 200, raised anywhere in a request and written by the app's handler."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, "BadRequestError", message, param)


def not_found(model: str, served: list[str]) -> ApiError:
    return ApiError(404, "NotFoundError", f"The model `{model}` does not exist: no live worker serves it. Served now: "
                    f"{', '.join(served) or 'none'}.", "model")


def unauthorized() -> ApiError:
    # Never echo the key that was sent.
    return ApiError(401, "AuthenticationError", "Invalid or missing API key: send `Authorization: Bearer <key>` "
                    "with one of the keys in gateway.api_keys.", None, {"WWW-Authenticate": "Bearer"})
