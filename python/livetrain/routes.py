"""The training routes, shared by every engine: livetrain's reference engine mounts them on its app, the
vLLM plugin on vLLM's API server. Clients cannot tell the engines apart because both serve this router.

Every route forwards one request to the trainer over its Unix socket (jobsock) and answers with the
trainer's reply, so validation and state live in one place: the trainer. docs/serve.md lists the routes.
"""

import hmac
import json
from typing import Callable, Sequence

from livetrain import jobsock

# route → (HTTP method, trainer op, whether the route takes a JSON body)
ROUTES = {
    "/train": ("POST", "submit", True),
    "/train/status": ("GET", "status", False),
    "/checkpoint": ("POST", "checkpoint", True),
    "/checkpoints": ("GET", "checkpoints", False),
    "/rollback": ("POST", "rollback", True),
}
# Seconds to wait for the trainer's reply. Checkpoint and rollback wait for the running step to end and
# then write the whole model's changes, which takes minutes for large models.
TIMEOUTS = {"checkpoint": 3600.0, "rollback": 3600.0}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    """The OpenAI-style error object every livetrain route answers with."""
    return {"error": {"message": message, "type": kind, "param": param}}


def parse_json_object(raw: bytes, empty_ok: bool) -> tuple[dict | None, dict | None]:
    """(body, None) for a JSON object, (None, error body) otherwise. An empty body is ``{}`` when allowed."""
    if not raw.strip() and empty_ok:
        return {}, None
    try:
        body = json.loads(raw)
    except ValueError as e:
        return None, error_body(f"request body is not JSON: {e}", "body")
    if not isinstance(body, dict):
        return None, error_body("request body must be a JSON object", "body")
    return body, None


Keys = str | Sequence[str] | None


def authorized(header: str | None, api_key: Keys) -> bool:
    """Whether an ``Authorization`` header carries the key, or one of the keys (always true without)."""
    keys = [k for k in ([api_key] if isinstance(api_key, str) else api_key or ()) if k]
    if not keys:
        return True
    got = (header or "").encode()
    # Every key is compared, so the time taken does not tell which one nearly matched.
    return sum(hmac.compare_digest(got, f"Bearer {k}".encode()) for k in keys) > 0


def training_router(trainer_socket: str | Callable[[], str], api_key: Keys | Callable[[], Keys] = None):
    """A FastAPI ``APIRouter`` with /train, /train/status, /checkpoint, /checkpoints and /rollback.

    ``trainer_socket`` is the trainer's socket path, or a callable returning it (read at each request,
    for servers that learn it late; an empty path answers 503). With ``api_key`` (a key, a list of keys,
    or a callable returning either, read at each request) the router checks ``Authorization: Bearer KEY``
    itself, for hosts whose own authentication does not cover these paths (vLLM's covers only /v1, /v2,
    /inference and /cohere); leave it None where the app already authenticates every route.
    """
    from fastapi import APIRouter, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    router = APIRouter()
    socket_path = trainer_socket if callable(trainer_socket) else (lambda: trainer_socket)
    keys = api_key if callable(api_key) else (lambda: api_key)

    def make(op: str, has_body: bool):
        async def handler(request: Request):
            if not authorized(request.headers.get("authorization"), keys()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)", None,
                                               "authentication_error"), status_code=401)
            message = {"op": op}
            if has_body:
                body, bad = parse_json_object(await request.body(), empty_ok=(op != "submit"))
                if bad is not None:
                    return JSONResponse(bad, status_code=400)
                message["job" if op == "submit" else "args"] = body
            try:
                path = socket_path()
                if not path:
                    raise jobsock.TrainerUnavailable("no trainer has been started")
                reply = await run_in_threadpool(jobsock.call, path, message, TIMEOUTS.get(op, 30.0))
            except jobsock.TrainerUnavailable as e:
                return JSONResponse(error_body(f"the trainer is not running or not ready yet ({e})", None,
                                               "unavailable"), status_code=503)
            return JSONResponse(reply["body"], status_code=reply["code"])

        handler.__name__ = f"livetrain_{op}"
        return handler

    for path, (method, op, has_body) in ROUTES.items():
        router.add_api_route(path, make(op, has_body), methods=[method])
    return router
