"""How the app answers an error over HTTP: always JSON {"error": message} with the error's status,
never FastAPI's default bodies; a client error is 4xx, only a fault of the server or model is 5xx."""

from typing import Any, Callable, Coroutine, Dict, Optional, Type, Union

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.protocol import BadRequest


def error_response(err: BadRequest, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    """The answer to `err`, with its own headers and `headers` (which win on a clash)."""
    return JSONResponse({"error": err.message}, status_code=err.status, headers={**err.headers, **(headers or {})})


async def bad_request(request: Request, err: BadRequest) -> JSONResponse:
    return error_response(err)


async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    # Unknown routes (404) and wrong methods (405) come from the router, before any endpoint runs.
    message = f"{err.detail}: {request.method} {request.url.path}"
    return JSONResponse({"error": message}, status_code=err.status_code, headers=err.headers)


async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": f"invalid request: {err.errors()}"}, status_code=400)


async def server_error(request: Request, err: Exception) -> JSONResponse:
    # Client errors never get here (they are BadRequest); this is a fault of the server or model.
    return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)


EXCEPTION_HANDLERS: Dict[Union[int, Type[Exception]], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    BadRequest: bad_request,
    StarletteHTTPException: http_error,
    RequestValidationError: invalid_request,
    Exception: server_error,
}
"""FastAPI exception handlers of the ingress app, by the exception type each answers."""
