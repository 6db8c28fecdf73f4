"""livetrain's reference engine: serves a Hugging Face causal LM whose weights live in shared memory
(OpenAI-style /v1/completions and /v1/chat/completions), and forwards /train routes to the trainer.

Before they are shared, the weights are set to the head generation of the model's checkpoint store
(created when missing), so that a restarted server serves what was last checkpointed. They are then
exported once (``export_cpu``: copied into a POSIX shared-memory segment that the model then serves from;
``export_cuda``: shared in place through CUDA IPC) and the manifest is written, so a trainer process can
attach and update them in place while requests are answered. docs/serve.md.

At ``--tensor-parallel N`` (started by ``livetrain serve --tensor-parallel N``) this process is one rank of N:
its weights are its shards in vLLM's layout, and rank 0 serves HTTP and drives the others
(livetrain.engines.ranks).

usage: python -m livetrain.engines.reference --model DIR --manifest FILE --trainer-socket PATH [--port N] ...
(normally started by ``python -m livetrain.serve``)
"""

import argparse
import asyncio
import json
import os
import queue
import signal
import sys
import time
import uuid
from typing import Iterator

import torch

from livetrain.engines import batching
from livetrain.engines import options as engine_options
from livetrain.safetensors import DTYPES
from livetrain.trainer import options, process, protocol, routes, security
from livetrain.trainer.examples import chat_text, check_messages, use_chat
from livetrain.trainer.protocol import Invalid


class Engine:
    """The model, its tokenizer, the shared weights, and the scheduler that decodes requests in batches
    (livetrain.engines.batching: ``max_batch`` at once, ``max_queue`` waiting)."""

    def __init__(
        self,
        model_dir: str,
        manifest: str,
        device: str = "cpu",
        dtype: str = "bf16",
        *,
        store: bool = True,
        store_dir: str | None = None,
        max_batch: int = engine_options.DEFAULT_MAX_BATCH,
        max_queue: int = engine_options.DEFAULT_MAX_QUEUE,
        batch_attention: str = engine_options.DEFAULT_BATCH_ATTENTION,
        static_cache_len: int = engine_options.DEFAULT_STATIC_CACHE_LEN,
        ranks=None,
        chat: options.Chat | None = None,
    ):
        import transformers

        from livetrain import checkpoint, kernels, layout, sharing

        # Before minutes of loading: a checkpoint livetrain cannot train in place (mixture-of-experts,
        # quantized, an unknown multimodal wrapper) is refused, naming its architecture and what is supported.
        layout.check(model_dir)
        self.model_dir, self.device = model_dir, torch.device(device)
        self.name = os.path.basename(os.path.normpath(model_dir))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        use_chat(self.tokenizer, chat or options.Chat())  # the chat-template options: the trainer renders with them too
        # Token ids a prompt may hold: the embedding's rows (the text config's vocab_size), at any TP size.
        text_config = transformers.AutoConfig.from_pretrained(model_dir).get_text_config()
        self.vocab = int(getattr(text_config, "vocab_size", 0) or len(self.tokenizer))
        self.ranks = ranks  # livetrain.trainer.ranks.Ranks of a tensor-parallel engine's rank 0, else None
        if ranks is not None:
            self._init_tensor_parallel(ranks, dtype, store, store_dir, manifest, max_batch, max_queue, batch_attention)
            return
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
        # Served as vLLM serves them (Gated DeltaNet's A_log in float32, widened from the files' dtype).
        for name, p in model.named_parameters():
            if layout.served_in_fp32(name):
                p.data = p.data.float()
        self.model = model.to(self.device).eval()
        # Generation runs the same layers as training: the fused kernels they got, or the torch path.
        for warning in kernels.prepare(self.model, self.device, backward=False):
            print(f"livetrain engine: warning: {warning}", file=sys.stderr, flush=True)
        self.kernels = kernels.report(self.model)
        params = dict(self.model.named_parameters())  # tied weights appear once
        config = json.loads(self.model.config.to_json_string())
        # The weights under the model files' names (a multimodal checkpoint is served as its text model;
        # its other tensors are not served): what the store saves and restores. Refuses, at start, a
        # checkpoint whose names livetrain cannot map, naming its architecture.
        served = checkpoint.by_file_names({n: p.data for n, p in params.items()}, model_dir)
        layout.load_fp32_exactly(served, model_dir)  # a float32 A_log in the files: its values, not bf16's
        # Before the manifest exists: the trainer attaches (and opens the store) only after it, so the
        # store's lock is free by then.
        self.checkpoint = None
        if store:
            self.checkpoint = checkpoint.restore_latest(served, model_dir, store_dir)
        if self.device.type == "cpu":
            self.exported = sharing.export_cpu(params, manifest, model_path=model_dir, config=config)
            # Serve from the segment from now on: the trainer's in-place updates land there.
            for name, p in params.items():
                p.data = self.exported.tensors[name]
        else:
            self.exported = sharing.export_cuda(params, manifest, model_path=model_dir, config=config)
        self._set_eos()
        self.scheduler = batching.Scheduler(
            self.model,
            self.eos,
            max_batch=max_batch,
            max_queue=max_queue,
            attention=batch_attention,
            static_length=static_cache_len,
        )
        decoder = self.scheduler.decoder
        if decoder is not None:  # requests longer than the static cache are refused (400) at the route
            self.max_len = min(self.max_len, decoder.length)
            print(
                f"livetrain engine: static KV cache {decoder.slots} x {decoder.length} positions: "
                f"{decoder.bytes / 2**20:.0f} MiB, CUDA graphs {'on' if decoder.graphs_wanted else 'off'}",
                file=sys.stderr,
                flush=True,
            )

    def _init_tensor_parallel(
        self, ranks, dtype, store, store_dir, manifest, max_batch, max_queue, batch_attention
    ) -> None:
        """Rank 0 of a tensor-parallel engine (livetrain.engines.ranks): its shards, shared as its own
        manifest, and the scheduler that drives every rank's model."""
        import transformers

        from livetrain import kernels
        from livetrain.engines import ranks as engine_ranks

        self.device = engine_ranks.rank_device(str(self.device), 0)
        w = engine_ranks.load(
            ranks, self.model_dir, manifest, self.device, DTYPES[dtype], store=store, store_dir=store_dir
        )
        self.model, self.exported, self.checkpoint = w.model, w.exported, w.checkpoint
        try:  # the model was built from config.json: its generation config (EOS ids) is the files'
            self.model.generation_config = transformers.GenerationConfig.from_pretrained(self.model_dir)
        except OSError:
            pass
        for warning in kernels.prepare(self.model, self.device, backward=False):
            print(f"livetrain engine: warning: {warning}", file=sys.stderr, flush=True)
        self.kernels = kernels.report(self.model)
        self._set_eos()
        self.driven = engine_ranks.Driven(self.model, ranks, w.vocab_rows)
        self.scheduler = engine_ranks.TPScheduler(
            self.driven, self.eos, max_batch=max_batch, max_queue=max_queue, attention=batch_attention
        )

    def _set_eos(self) -> None:
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos = set()
        for ids in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            self.eos.update(ids if isinstance(ids, list) else [] if ids is None else [ids])

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer generate until a restart, else None: a tensor-parallel engine's rank
        died or failed, or the scheduler serves no more (its loop failed, or it was closed)."""
        if self.ranks is not None and self.ranks.failure is not None:
            return self.ranks.failure
        return self.scheduler.failure

    def close(self) -> None:
        """Stops the scheduler (waiting requests get an error), the other ranks, and the sharing."""
        self.scheduler.close()
        if self.ranks is not None:
            self.driven.close()
        self.exported.close()

    # ---- tokens (called off the event loop: a long text takes a while) ----
    def _encode(self, text: str, field: str, **kw) -> list[int]:
        # A text far longer than the context is refused from its beginning alone: tokenizing megabytes
        # only to refuse them would take the CPU for a minute (issue #13). A prefix never has many more
        # tokens than the whole text has.
        probe = 16 * min(self.max_len, 1 << 20) + 64
        if len(text) > probe and len(self.tokenizer(text[:probe], **kw)["input_ids"]) > self.max_len + 16:
            raise Invalid(field, f"{field} is longer than the engine's context of {self.max_len} tokens")
        return self.tokenizer(text, **kw)["input_ids"]

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._encode(prompt, "prompt")

    def encode_chat(self, messages: list[dict], kwargs: dict | None = None) -> list[int]:
        """``messages`` as the chat template renders them (``kwargs``: the request's own template variables,
        over the defaults); ``Invalid`` naming ``messages`` without one."""
        text = chat_text(
            self.tokenizer, messages, "messages", instead="send a prompt to /v1/completions", kwargs=kwargs
        )
        return self._encode(text, "messages", add_special_tokens=False)

    def sequence(self, ids: list[int], params: dict, sink: batching.Sink) -> batching.Sequence:
        """A request for the scheduler (``params``: ``sampling_params``; ``stop`` is the TextStream's)."""
        return batching.Sequence(
            ids, params["max_tokens"], params["temperature"], params["top_p"], params["seed"], sink
        )

    def text(self, params: dict) -> batching.TextStream:
        return batching.TextStream(self.tokenizer, params["stop"], self.eos)

    def generate(
        self,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str],
        seed: int | None = None,
    ) -> Iterator[tuple[str, str | None, int]]:
        """Yields (text delta, finish_reason or None, tokens generated so far); the last item has the
        finish reason. Blocks the calling thread (the HTTP routes use the same scheduler asynchronously);
        QueueFull when the admission queue is full."""
        params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        events: queue.SimpleQueue = queue.SimpleQueue()
        seq = self.sequence(ids, params, lambda *e: events.put(e))
        text = self.text(params)
        self.scheduler.submit(seq)
        try:
            while True:
                tok, finish, error = events.get()
                if error is not None:
                    raise RuntimeError(f"generation failed: {error}")
                delta, reason = text.feed(tok, finish)
                if reason is not None or delta:
                    yield delta, reason, text.tokens
                if reason is not None:
                    return
        finally:
            self.scheduler.cancel(seq)  # a stop string, or a caller that stopped iterating


# ---- request parsing: every error names its field ----
def _field(body: dict, name: str, types, default=None, check=None, what: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise Invalid(name, f"{name} must be {what or types}")
    if not isinstance(v, types) or (check is not None and not check(v)):
        raise Invalid(name, f"{name} must be {what}, got {json.dumps(v)[:80]}")
    return v


def stream_mode(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage): ``stream_options.include_usage`` (OpenAI's) adds a last chunk with the
    token counts to a stream."""
    stream = _field(body, "stream", bool, False, None, "true or false")
    opts = _field(body, "stream_options", dict, {}, None, "an object")
    if opts and not stream:
        raise Invalid("stream_options", "stream_options is only allowed with stream: true")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise Invalid("stream_options.include_usage", "stream_options.include_usage must be true or false")
    return stream, usage


def sampling_params(body: dict, default_max: int) -> dict:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise Invalid("stop", "stop must be a non-empty string or a list of at most 4 of them")
    n = _field(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request)")
    del n
    return dict(
        # OpenAI's newer name for it (chat), preferred when both are given, as vLLM does.
        max_tokens=_field(
            body,
            "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens",
            int,
            default_max,
            lambda v: v >= 1,
            "an integer >= 1",
        ),
        temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
        top_p=float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        stop=stop,
        seed=_field(body, "seed", int, None, lambda v: -(1 << 63) <= v < 1 << 64, "an integer in [-2^63, 2^64)"),
    )


# OpenAI request fields (and vLLM's common sampling extras) this engine does not implement, with the values
# that ask for nothing: a request setting one otherwise is refused, naming it, rather than answered as if it
# were not there (vLLM implements them; a client relying on one must not get a silently different answer).
# Fields neither API has are ignored, as vLLM ignores them.
NOT_IMPLEMENTED = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "top_k": (None, 0, -1),
    "min_p": (None, 0),
    "min_tokens": (None, 0),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


class UnknownModel(Invalid):
    """A request names a model this engine does not serve: 404, as vLLM answers it."""

    def reply(self) -> protocol.Reply:
        return protocol.error(404, str(self), self.param)


def check_request(body: dict, served: str) -> None:
    """Refuses a request for another model than ``served`` (404) or one setting a field of
    ``NOT_IMPLEMENTED`` to anything but its off values (400 naming it)."""
    model = body.get("model")
    if model is not None and model != served:
        raise UnknownModel(
            "model", f"the model {json.dumps(model)[:80]} does not exist (this server serves {served!r})"
        )
    for name, off in NOT_IMPLEMENTED.items():
        v = body.get(name)
        # true/false only match true/false (logprobs 0 asks for the chosen token's), numbers match as numbers
        if not any(v is o if isinstance(v, bool) or isinstance(o, bool) or o is None else v == o for o in off):
            raise Invalid(name, f"{name} is not implemented by livetrain's reference engine (vLLM's serving has it)")


def parse_chat_template_kwargs(body: dict) -> dict:
    """A chat request's own ``chat_template_kwargs`` (an object of template variables, over
    ``--default-chat-template-kwargs``: vLLM merges them so). A request's own ``chat_template`` is refused: the
    engine renders with the template it was started with, the one the trainer trains with (vLLM refuses it
    too unless started with ``--trust-request-chat-template``)."""
    if body.get("chat_template") is not None:
        raise Invalid(
            "chat_template", "chat_template: a request cannot bring its own; the engine renders with --chat-template's"
        )
    value = body.get("chat_template_kwargs")
    if value is None:
        return {}
    if not isinstance(value, dict):  # options.chat_template_kwargs reads a string as JSON: a flag's, not a body's
        raise Invalid(
            "chat_template_kwargs",
            f"chat_template_kwargs must be an object of template variables, got {json.dumps(value)[:40]}",
        )
    try:
        return options.chat_template_kwargs(value)
    except argparse.ArgumentTypeError as e:
        raise Invalid("chat_template_kwargs", f"chat_template_kwargs: {e}") from None


def parse_prompt(body: dict, vocab: int) -> str | list[int]:
    """A completion's ``prompt``: a string, or token ids (a list of integers, as vLLM and OpenAI take them),
    each in ``[0, vocab)``; either alone or as the one item of a list (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise Invalid("prompt", f"prompt: token id {bad} is not in the model's vocabulary [0, {vocab})")
        return prompt
    raise Invalid("prompt", "prompt must be a string or a non-empty list of token ids (one prompt per request)")


def build_app(
    engine: Engine, trainer_socket: str, api_key: str | None = None, max_body: int = security.DEFAULT_MAX_BODY_MIB << 20
):
    """The FastAPI application: OpenAI-style generation, the training routes (livetrain.trainer.routes)
    forwarded to the trainer, every route behind ``Authorization: Bearer <api_key>`` when a key is set,
    and without one, cross-site requests refused (livetrain.trainer.security). Bodies over ``max_body``
    bytes are 413; parsing and tokenization run off the event loop, generation in the engine's
    scheduler: no route waits for another."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="livetrain reference engine")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        # GET /health answers without the key (as vLLM's: a probe carries no secret); only its status code
        # is public, the reason of a 503 is the key holder's.
        probe = request.url.path == "/health" and request.method in ("GET", "HEAD")
        if not probe and not routes.authorized(request.headers.get("authorization"), api_key):
            return routes.json_response(protocol.error(401, routes.MISSING_KEY))
        refused = None if api_key else security.cross_site(request.method, request.headers)
        if refused is not None:
            return routes.json_response(refused)
        return await call_next(request)

    async def json_body(request: Request) -> dict:
        return await run_in_threadpool(protocol.parse_body, await security.read_body(request, max_body), False)

    @app.exception_handler(Invalid)
    async def invalid(request: Request, e: Invalid):
        return routes.json_response(e.reply())

    @app.exception_handler(security.TooLarge)
    async def too_large(request: Request, e: security.TooLarge):
        return routes.json_response(e.reply())

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, e: StarletteHTTPException):
        # The router's 404 and 405 (Starlette's {"detail": ...}) in the one error shape, with their Allow header.
        allow = (e.headers or {}).get("Allow")
        message = f"{request.method} {request.url.path}: {e.detail}" + (f" (allowed: {allow})" if allow else "")
        r = protocol.error(e.status_code, message)
        return JSONResponse(r.body, status_code=r.code, headers=e.headers)

    async def completion(kind: str, ids: list[int], params: dict, stream: tuple[bool, bool]):
        if not ids:  # an empty prompt (a tokenizer that adds no BOS): nothing to continue from
            raise Invalid("prompt", "prompt is empty: it has no token to continue from")
        if len(ids) + params["max_tokens"] > engine.max_len:
            raise Invalid(
                "max_tokens",
                f"prompt ({len(ids)} tokens) + max_tokens ({params['max_tokens']}) "
                f"exceeds the engine's context of {engine.max_len} tokens"
                + (" (the static KV cache's length, --static-cache-len)" if engine.scheduler.decoder else ""),
            )
        if engine.failure is not None:  # a rank died, the scheduler stopped: no generation until a restart
            return routes.json_response(protocol.error(503, f"the engine cannot generate: {engine.failure}"))
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": engine.name}
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seq = engine.sequence(ids, params, lambda *e: loop.call_soon_threadsafe(events.put_nowait, e))
        text = engine.text(params)
        try:
            engine.scheduler.submit(seq)
        except batching.QueueFull as e:
            r = protocol.error(503, str(e))
            return JSONResponse(r.body, status_code=r.code, headers={"Retry-After": str(e.retry_after)})
        except batching.Stopped as e:  # shutting down, or the scheduler's thread failed
            return routes.json_response(protocol.error(503, f"the engine cannot generate: {e}"))

        async def pieces():
            """(text delta, finish reason) as the scheduler decodes; the request leaves the batch when
            this ends, however it ends (a stop string, the client gone)."""
            try:
                while True:
                    tok, finish, error = await events.get()
                    if error is not None:
                        raise RuntimeError(error)
                    delta, reason = text.feed(tok, finish)
                    if reason is not None or delta:
                        yield delta, reason
                    if reason is not None:
                        return
            finally:
                engine.scheduler.cancel(seq)

        def choice(text: str, finish, delta: bool) -> dict:
            if kind == "chat" and delta:  # as vLLM and OpenAI stream: the role only in the first chunk
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            if kind == "chat":
                return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def usage() -> dict:
            n = text.tokens
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if stream[0]:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

            async def events_sse():
                try:
                    if kind == "chat":
                        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        yield f"data: {json.dumps({**base, 'object': obj, 'choices': [first]})}\n\n"
                    async for delta, finish in pieces():
                        chunk = {**base, "object": obj, "choices": [choice(delta, finish, True)]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if stream[1]:
                        yield f"data: {json.dumps({**base, 'object': obj, 'choices': [], 'usage': usage()})}\n\n"
                except RuntimeError as e:
                    yield f"data: {json.dumps(protocol.error(500, f'generation failed: {e}').body)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events_sse(), media_type="text/event-stream")
        parts, finish = [], None
        try:
            async for delta, finish in pieces():
                parts.append(delta)
        except RuntimeError as e:  # 503 when a rank died or the scheduler stopped: nothing generates until a restart
            return routes.json_response(protocol.error(503 if engine.failure else 500, f"generation failed: {e}"))
        return JSONResponse(
            {
                **base,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "choices": [choice("".join(parts), finish, False)],
                "usage": usage(),
            }
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        check_request(body, engine.name)
        prompt = parse_prompt(body, engine.vocab)
        params = sampling_params(body, 16)
        stream = stream_mode(body)
        ids = prompt if isinstance(prompt, list) else await run_in_threadpool(engine.encode_prompt, prompt)
        return await completion("text", ids, params, stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        check_request(body, engine.name)
        messages = check_messages(body.get("messages"))
        kwargs = parse_chat_template_kwargs(body)
        stream = stream_mode(body)
        ids = await run_in_threadpool(engine.encode_chat, messages, kwargs)
        params = sampling_params(body, max(1, engine.max_len - len(ids)))
        return await completion("chat", ids, params, stream)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request):
        """200 (empty) while the engine can generate; else 503, which stays until a restart (as vLLM's /health:
        what load balancers and liveness probes read). No key needed; the 503 names why to a caller with it."""
        failure = engine.failure
        if failure is None:
            return Response(status_code=200)
        if not routes.authorized(request.headers.get("authorization"), api_key):
            return routes.json_response(
                protocol.error(503, "the engine cannot generate (the reason: with the API key)")
            )
        return routes.json_response(protocol.error(503, f"the engine cannot generate: {failure}"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "livetrain"}]}

    # /train, /train/status, /checkpoint, /checkpoints, /rollback: forwarded to the trainer (livetrain.trainer.routes).
    # Authentication and the cross-site checks are the middleware's above, for every route.
    app.include_router(routes.training_router(trainer_socket, same_origin=False, max_body=max_body))

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m livetrain.engines.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--manifest", required=True, help="where to write the sharing manifest")
    p.add_argument("--trainer-socket", required=True, help="the trainer's Unix socket")
    p.add_argument("--device", default="cpu", type=options.device, help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=options.port, default=8000, help="TCP port, 0 to 65535 (default 8000)")
    security.add_api_key_options(p)
    options.add_store_options(p)
    options.add_chat_options(p)
    engine_options.add_options(p)
    a = p.parse_args(argv)
    problem = engine_options.check(a)
    if problem:
        p.error(problem)
    try:
        api_key = security.api_key(a)
    except (OSError, ValueError) as e:
        p.error(str(e))
    security.private_files()
    import uvicorn

    from livetrain import Error
    from livetrain.engines import ranks as engine_ranks

    ranks = None
    if a.tensor_parallel > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) != a.tensor_parallel:
            p.error(
                f"--tensor-parallel {a.tensor_parallel}: the engine's ranks are started by `livetrain serve "
                "--tensor-parallel N`, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )
        ranks = engine_ranks.start(a.device, os.path.dirname(os.path.abspath(a.manifest)))
        if ranks.rank > 0:
            device = engine_ranks.rank_device(a.device, ranks.rank)
            try:
                weights = engine_ranks.load(
                    ranks, a.model, a.manifest, device, DTYPES[a.dtype], store=not a.no_store, store_dir=a.store
                )
            except Exception as e:  # rank 0 says why too when the reason is the model's (it loads the same)
                sys.exit(f"livetrain engine rank {ranks.rank}: {type(e).__name__}: {e}")
            process.freeze_startup_heap()
            engine_ranks.serve_rank(ranks, weights, device)
            return
    try:
        engine = Engine(
            a.model,
            a.manifest,
            a.device,
            a.dtype,
            store=not a.no_store,
            store_dir=a.store,
            max_batch=a.max_batch,
            max_queue=a.max_queue,
            batch_attention=a.batch_attention,
            static_cache_len=a.static_cache_len,
            ranks=ranks,
            chat=options.chat(a),
        )
    except (Error, batching.static.CacheTooLarge) as e:  # a bad model directory or store, a cache too large
        sys.exit(f"livetrain engine: {e}")
    if engine.checkpoint is not None:
        c = engine.checkpoint
        print(
            f"livetrain engine: serving generation {c['generation']} (weight version {c['weight_version']}) of "
            f"the checkpoint store {c['store']}{' (created)' if c['created'] else ''}",
            file=sys.stderr,
            flush=True,
        )
    if not engine.scheduler.batchable and a.max_batch > 1:
        print(
            "livetrain engine: this model's cache is not a plain key/value cache (sliding windows or linear "
            "attention): requests are decoded one at a time",
            file=sys.stderr,
            flush=True,
        )
    if engine.kernels:
        print(f"livetrain engine: kernels {json.dumps(engine.kernels)}", file=sys.stderr, flush=True)
    process.freeze_startup_heap()  # the start's objects out of the collector's way (no pause mid-request)
    # uvicorn handles SIGTERM, shuts down, then raises the signal again; with the default action the process
    # would die right there, before the finally below unlinks the shared-memory segment (the whole model,
    # left in /dev/shm until reboot).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        app = build_app(engine, a.trainer_socket, api_key, a.max_body_mib << 20)
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
