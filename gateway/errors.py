"""Errors in OpenAI's JSON shape, with the status codes OpenAI clients branch on.

Every error answer is ``{"error": {"message", "type", "param", "code"}}`` as vLLM's
``ErrorResponse`` writes it (``type`` an exception-like name, ``code`` the HTTP status):

====  ==========================  ==================================================
400   BadRequestError             invalid input; ``param`` names the parameter
401   AuthenticationError         ``gateway.api_keys`` is set and the Bearer key is not one of them
404   NotFoundError               the model no live worker serves (the message lists those served)
409   ConflictError               cancelling a batch that already ended (``/v1/batches``)
410   CancelledError              the job was cancelled (``vqueue cancel``, a purge, a client gone)
429   RateLimitError              the model's backlog is at ``queue.max_backlog``; ``Retry-After``
500   InternalServerError         the engine failed on the job (``EngineError``, ``Quarantined``)
503   ServiceUnavailableError     Redis cannot be reached
504   GatewayTimeoutError         the job's deadline or the request's timeout passed; names the job id
====  ==========================  ==================================================
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from producer.openai_api import ApiError, bad_request

__all__ = ["ApiError", "bad_request", "not_found", "response", "unauthorized"]


def response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def not_found(model: str, served: list[str]) -> ApiError:
    return ApiError(404, "NotFoundError", f"The model `{model}` does not exist: no live worker serves it. Served now: "
                    f"{', '.join(served) or 'none'}.", "model")


def unauthorized() -> ApiError:
    # Never echo the key that was sent.
    return ApiError(401, "AuthenticationError", "Invalid or missing API key: send `Authorization: Bearer <key>` "
                    "with one of the keys in gateway.api_keys.", None, {"WWW-Authenticate": "Bearer"})
