"""The training routes, shared by every engine: livetrain's reference engine mounts them on its app, the
vLLM plugin on vLLM's API server. Clients cannot tell the engines apart because both serve this router.

Every route forwards its request body, as bytes, to the trainer over its Unix socket (trainer.protocol)
and answers with the trainer's status and body bytes, so validation and state live in one place: the
trainer. docs/serve.md lists the routes.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at run time.
import hmac
import json
from typing import Callable, NamedTuple, Sequence

from livetrain.trainer import protocol, security


class Route(NamedTuple):
    """A training route: what it forwards to the trainer. ``body``: the request's body as it arrived
    (True), none (False), or, for the routes of one job, ``{"job_id": ...}`` from the URL ("job_id")."""

    path: str
    method: str
    op: str
    body: bool | str


# In matching order: fixed paths before /train/{job_id}.
ROUTES = [
    Route("/train", "POST", "submit", True),
    Route("/train/status", "GET", "status", False),
    Route("/train/retention", "GET", "retention", False),
    Route("/train/retention", "PUT", "set_retention", True),
    Route("/train/{job_id}", "GET", "job", "job_id"),
    Route("/train/{job_id}", "DELETE", "cancel", "job_id"),
    Route("/train/{job_id}/cancel", "POST", "cancel", "job_id"),
    Route("/checkpoint", "POST", "checkpoint", True),
    Route("/checkpoints", "GET", "checkpoints", False),
    Route("/rollback", "POST", "rollback", True),
]
# The fixed paths under /train/ (GET /train/status, ...), and the dot segments a client's URL resolution removes:
# a job of such an id could not be read or cancelled at /train/{job_id} (GET /train/status answered the
# server's status, DELETE /train/status cancelled the job), so no job may take one (trainer.examples.job_id).
JOB_IDS_TAKEN = frozenset(
    {r.path.split("/")[2] for r in ROUTES if r.path.count("/") == 2 and r.path.startswith("/train/")} - {"{job_id}"}
) | {".", ".."}
# Where the reference engine serves the trainer's Prometheus metrics; the vLLM plugin, whose server has a
# /metrics of its own, serves them at VLLM_METRICS_PATH.
METRICS_PATH = "/metrics"
VLLM_METRICS_PATH = "/livetrain/metrics"
# Seconds to wait for the trainer's reply. Checkpoint and rollback wait for the running step to end and
# then write the whole model's changes, which takes minutes for large models; a large job takes a while
# to tokenize (a retry with the same Idempotency-Key gets the same job, never a second one).
TIMEOUTS = {"checkpoint": 3600.0, "rollback": 3600.0, "submit": 600.0}
# Where `livetrain serve`, its engine and `livetrain train` read the API key from when not given.
API_KEY_ENV = security.API_KEY_ENV
MISSING_KEY = "missing or wrong API key (Authorization: Bearer KEY)"

Keys = str | Sequence[str] | None


def authorized(header: str | None, api_key: Keys) -> bool:
    """Whether an ``Authorization`` header carries the key, or one of the keys (always true without), in the
    ``Bearer`` scheme, whose name is case-insensitive (RFC 7235: ``bearer KEY`` too)."""
    keys = [k for k in ([api_key] if isinstance(api_key, str) else api_key or ()) if k]
    if not keys:
        return True
    scheme, _, token = (header or "").partition(" ")
    got = token.encode() if scheme.lower() == "bearer" else b""  # b"": no key matches it (keys are not empty)
    # Every key is compared, so the time taken does not tell which one nearly matched.
    return sum(hmac.compare_digest(got, k.encode()) for k in keys) > 0


def json_response(reply: protocol.Reply):
    """A FastAPI response for a reply built here (errors); the trainer's replies pass through as bytes."""
    from fastapi.responses import JSONResponse

    return JSONResponse(reply.body, status_code=reply.code)


def unavailable(path: str, e: protocol.TrainerUnavailable) -> protocol.Reply:
    """The reply when the trainer does not answer: 504 when it took the request and may still act on it,
    else 503 with the reason its launcher recorded (it died and is being restarted, ...)."""
    if isinstance(e, protocol.TrainerTimeout):
        return protocol.error(
            504,
            f"the trainer did not answer in time ({e}); it may still act on the request: retry with the same "
            "Idempotency-Key (or job id) to get the same job rather than a second one",
        )
    down = protocol.read_down(path) if path else None
    if down:
        return protocol.error(503, f"the trainer is not running: {down}; serving goes on")
    return protocol.error(503, f"the trainer is not running or not ready yet ({e})")


def training_router(
    trainer_socket: str | Callable[[], str],
    api_key: Keys | Callable[[], Keys] = None,
    metrics_path: str = METRICS_PATH,
    *,
    same_origin: bool = True,
    max_body: int = security.DEFAULT_MAX_BODY_MIB << 20,
):
    """A FastAPI ``APIRouter`` with the training routes (``ROUTES``) and the trainer's Prometheus metrics
    at ``metrics_path`` (livetrain.trainer.metrics).

    ``trainer_socket`` is the trainer's socket path, or a callable returning it (read at each request,
    for servers that learn it late; an empty path answers 503). With ``api_key`` (a key, a list of keys,
    or a callable returning either, read at each request) the router checks ``Authorization: Bearer KEY``
    itself, for hosts whose own authentication does not cover these paths (vLLM's covers only /v1, /v2,
    /inference and /cohere); leave it None where the app already authenticates every route. Without
    keys and with ``same_origin`` (leave it False where the app already applies it to every route), the
    router refuses cross-site requests (``security.cross_site``). Bodies over ``max_body`` bytes are 413.
    """
    from fastapi import APIRouter, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response

    router = APIRouter()
    socket_path = trainer_socket if callable(trainer_socket) else (lambda: trainer_socket)
    keys = api_key if callable(api_key) else (lambda: api_key)

    def refusal(request) -> protocol.Reply | None:
        """Why a request is refused before it reaches the trainer: a missing or wrong key (401), or, with no
        key set, a cross-site request (security.cross_site); None when it may go on."""
        allowed = keys()
        if not authorized(request.headers.get("authorization"), allowed):
            return protocol.error(401, MISSING_KEY)
        return security.cross_site(request.method, request.headers) if same_origin and not allowed else None

    def make(op: str, has_body: bool | str):
        async def handler(request: Request):
            refused = refusal(request)
            if refused is not None:
                return json_response(refused)
            path = ""
            try:
                if has_body == "job_id":
                    body = json.dumps({"job_id": request.path_params["job_id"]}).encode()
                else:
                    body = await security.read_body(request, max_body) if has_body else b""
                path = socket_path()
                if not path:
                    raise protocol.TrainerUnavailable("no trainer has been started")
                code, reply = await run_in_threadpool(
                    protocol.call, path, op, body, TIMEOUTS.get(op, 30.0), request.headers.get("idempotency-key")
                )
            except (protocol.Invalid, security.TooLarge) as e:
                return json_response(e.reply())
            except protocol.TrainerUnavailable as e:
                return json_response(unavailable(path, e))
            return Response(reply, status_code=code, media_type="application/json")

        handler.__name__ = f"livetrain_{op}"
        return handler

    for r in ROUTES:
        router.add_api_route(r.path, make(r.op, r.body), methods=[r.method], name=f"livetrain_{r.op}_{r.method}")

    async def metrics(request: Request):
        from livetrain.trainer import metrics as prometheus

        refused = refusal(request)
        if refused is not None:
            return json_response(refused)
        snapshot = None
        try:
            path = socket_path()
            if path:
                code, reply = await run_in_threadpool(protocol.call, path, "metrics", b"", 10.0)
                snapshot = json.loads(reply) if code == 200 else None
        except (protocol.TrainerUnavailable, ValueError):
            pass  # livetrain_trainer_up 0
        return Response(prometheus.render(snapshot), media_type=prometheus.CONTENT_TYPE)

    router.add_api_route(metrics_path, metrics, methods=["GET"], name="livetrain_metrics")
    return router
