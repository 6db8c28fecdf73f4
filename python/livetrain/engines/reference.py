"""livetrain's reference engine: serves a Hugging Face causal LM whose weights live in shared memory
(OpenAI-style /v1/completions and /v1/chat/completions), and forwards /train routes to the trainer.

Before they are shared, the weights are set to the head generation of the model's checkpoint store
(created when missing), so that a restarted server serves what was last checkpointed. They are then
exported once (``export_cpu``: copied into a POSIX shared-memory segment that the model then serves from;
``export_cuda``: shared in place through CUDA IPC) and the manifest is written, so a trainer process can
attach and update them in place while requests are answered. docs/serve.md.

usage: python -m livetrain.engines.reference --model DIR --manifest FILE --trainer-socket PATH [--port N] ...
(normally started by ``python -m livetrain.serve``)
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from typing import Iterator

import torch

from livetrain.safetensors import DTYPES
from livetrain.trainer import options, protocol, routes
from livetrain.trainer.examples import check_messages
from livetrain.trainer.protocol import Invalid


class Engine:
    """The model, its tokenizer and the shared weights; one generation at a time (``lock``)."""

    def __init__(
        self,
        model_dir: str,
        manifest: str,
        device: str = "cpu",
        dtype: str = "bf16",
        *,
        store: bool = True,
        store_dir: str | None = None,
    ):
        import transformers

        from livetrain import checkpoint, kernels, layout, sharing

        # Before minutes of loading: a checkpoint livetrain cannot train in place (mixture-of-experts,
        # quantized, an unknown multimodal wrapper) is refused, naming its architecture and what is supported.
        layout.check(model_dir)
        self.model_dir, self.device = model_dir, torch.device(device)
        self.name = os.path.basename(os.path.normpath(model_dir))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
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
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos = set()
        for ids in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            self.eos.update(ids if isinstance(ids, list) else [] if ids is None else [ids])
        self.lock = threading.Lock()

    # ---- tokens ----
    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def _tokens(
        self, ids: list[int], max_tokens: int, temperature: float, top_p: float, generator: torch.Generator | None
    ) -> Iterator[int]:
        x = torch.tensor([ids], device=self.device)
        past = None
        for _ in range(max_tokens):
            out = self.model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if temperature <= 0:
                tok = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    sorted_p, order = torch.sort(probs, descending=True)
                    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                    drop = torch.cumsum(sorted_p, 0) - sorted_p >= top_p
                    sorted_p[drop] = 0.0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                tok = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            yield tok
            if tok in self.eos:
                return
            x = torch.tensor([[tok]], device=self.device)

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
        finish reason. Text that might begin a stop string is held back until it cannot."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        hold = max((len(s) for s in stop), default=1) - 1
        out: list[int] = []
        sent = 0
        with self.lock:
            for tok in self._tokens(ids, max_tokens, temperature, top_p, generator):
                if tok in self.eos:
                    text = self.tokenizer.decode(out, skip_special_tokens=True)
                    yield text[sent:], "stop", len(out) + 1
                    return
                out.append(tok)
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                cut = min((i for i in (text.find(s, max(0, sent - hold)) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    yield text[sent:cut], "stop", len(out)
                    return
                safe = max(sent, len(text) - hold)
                if safe > sent:
                    yield text[sent:safe], None, len(out)
                    sent = safe
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            yield text[sent:], "length", len(out)


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
        max_tokens=_field(body, "max_tokens", int, default_max, lambda v: v >= 1, "an integer >= 1"),
        temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
        top_p=float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        stop=stop,
        seed=_field(body, "seed", int, None, None, "an integer"),
    )


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise Invalid("prompt", "prompt must be a string (or a list of one string)")
    return prompt


def build_app(engine: Engine, trainer_socket: str, api_key: str | None = None):
    """The FastAPI application: OpenAI-style generation, the training routes (livetrain.trainer.routes)
    forwarded to the trainer, every route behind ``Authorization: Bearer <api_key>`` when a key is set."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="livetrain reference engine")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if not routes.authorized(request.headers.get("authorization"), api_key):
            return routes.json_response(protocol.error(401, routes.MISSING_KEY))
        return await call_next(request)

    async def json_body(request: Request) -> dict:
        return protocol.parse_body(await request.body(), empty_ok=False)

    @app.exception_handler(Invalid)
    async def invalid(request: Request, e: Invalid):
        return routes.json_response(e.reply())

    def completion(kind: str, ids: list[int], params: dict, stream: bool):
        if len(ids) + params["max_tokens"] > engine.max_len:
            raise Invalid(
                "max_tokens",
                f"prompt ({len(ids)} tokens) + max_tokens ({params['max_tokens']}) "
                f"exceeds the model's context of {engine.max_len} tokens",
            )
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": engine.name}

        def choice(text: str, finish, delta: bool) -> dict:
            if kind == "chat":
                key = "delta" if delta else "message"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if stream:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def events():
                for text, finish, _ in engine.generate(ids, **params):
                    if text or finish:
                        yield f"data: {json.dumps({**base, 'object': obj, 'choices': [choice(text, finish, True)]})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        parts, finish, n = [], None, 0
        for text, finish, n in engine.generate(ids, **params):
            parts.append(text)
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        return JSONResponse(
            {
                **base,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "choices": [choice("".join(parts), finish, False)],
                "usage": usage,
            }
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        prompt = parse_prompt(body)
        params = sampling_params(body, 16)
        stream = _field(body, "stream", bool, False, None, "true or false")
        ids = engine.encode_prompt(prompt)
        return await run_in_threadpool(completion, "text", ids, params, stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        messages = check_messages(body.get("messages"))
        ids = engine.encode_chat(messages)
        params = sampling_params(body, max(1, engine.max_len - len(ids)))
        stream = _field(body, "stream", bool, False, None, "true or false")
        return await run_in_threadpool(completion, "chat", ids, params, stream)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "livetrain"}]}

    # /train, /train/status, /checkpoint, /checkpoints, /rollback: forwarded to the trainer (livetrain.trainer.routes).
    app.include_router(routes.training_router(trainer_socket))

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m livetrain.engines.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--manifest", required=True, help="where to write the sharing manifest")
    p.add_argument("--trainer-socket", required=True, help="the trainer's Unix socket")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get(routes.API_KEY_ENV), help=f"default ${routes.API_KEY_ENV}")
    options.add_store_options(p)
    a = p.parse_args(argv)
    import uvicorn

    from livetrain import Error

    try:
        engine = Engine(a.model, a.manifest, a.device, a.dtype, store=not a.no_store, store_dir=a.store)
    except Error as e:  # a bad model directory or checkpoint store: the message names it
        sys.exit(f"livetrain engine: {e}")
    if engine.checkpoint is not None:
        c = engine.checkpoint
        print(
            f"livetrain engine: serving generation {c['generation']} (weight version {c['weight_version']}) of "
            f"the checkpoint store {c['store']}{' (created)' if c['created'] else ''}",
            file=sys.stderr,
            flush=True,
        )
    if engine.kernels:
        print(f"livetrain engine: kernels {json.dumps(engine.kernels)}", file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM, shuts down, then raises the signal again; with the default action the process
    # would die right there, before the finally below unlinks the shared-memory segment (the whole model,
    # left in /dev/shm until reboot).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(build_app(engine, a.trainer_socket, a.api_key), host=a.host, port=a.port, log_level="warning")
    finally:
        engine.exported.close()


if __name__ == "__main__":
    main()
