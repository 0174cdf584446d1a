"""An OpenAI-compatible completions server on onnxruntime, with continuous batching and hard limits.

    python -m serve.server EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--max-batch 16] ...

A request goes through three steps, each a function that can be read and tested alone:

    decode_request   the JSON body to `Work` (token ids, sampling settings, seeds), or a RequestError
    predict          `Work` into the model loop (serve.scheduler), and its events back
    encode_*         events to an OpenAI `text_completion` object, or to server-sent events

Streaming and non-streaming share the first two. FastAPI and uvicorn carry HTTP and validation;
serve.guard bounds connections, time and bytes; the model runs in serve.scheduler's thread.

Imports no torch.
"""

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gpt.sampling import SamplingParams
from serve.batch import Event, Sequence, validate_request
from serve.guard import ConnectionGuard, RequestGuard, error_body
from serve.manifest import VARIANTS
from serve.runtime import OnnxModel
from serve.scheduler import (
    DEADLINE_GRACE_S,
    Limits,
    QueueFull,
    Request,
    Scheduler,
    SchedulerDown,
    Ticket,
    log_error,
)


class CompletionRequest(BaseModel):
    """The OpenAI completions request this server understands; any other field is an error.
    Bounds that depend on the server's limits are checked by decode_request."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    user: str | None = None  # accepted and ignored, as by OpenAI's server


class RequestError(Exception):
    """A request the server answers with an error: the status, and the body's message and fields."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status)


@dataclass
class Work:
    """A decoded request: what the model loop needs."""

    ids: list[list[int]]  # token ids of each prompt
    n: int  # completions per prompt
    max_tokens: int
    params: SamplingParams
    stops: list[str]
    seed: int  # the n-th completion of a prompt uses seed + n
    stream: bool


def decode_request(body: CompletionRequest, model: OnnxModel, limits: Limits, model_id: str) -> Work:
    """Check a parsed body against this server's model and limits; turn its prompts into token ids."""
    if body.model not in (None, model_id):
        raise RequestError(404, f"model {body.model!r} is not served here; this server serves {model_id!r}",
                           "model", code="model_not_found")
    if body.max_tokens > limits.max_new_tokens:
        raise RequestError(400, f"max_tokens: must be at most {limits.max_new_tokens}", "max_tokens")
    if body.n > limits.max_n:
        raise RequestError(400, f"n: must be at most {limits.max_n}", "n")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) > limits.max_prompts:
        raise RequestError(400, f"prompt must be a string or a list of 1 to {limits.max_prompts} strings", "prompt")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise RequestError(400, "stop must be up to 4 non-empty strings", "stop")
    if len(prompts) * body.n > limits.max_queue:  # would never fit, however long the client waited
        raise RequestError(400, f"{len(prompts)} prompt(s) x n={body.n} is {len(prompts) * body.n} sequences, over "
                           f"this server's limit of {limits.max_queue}: send fewer prompts or a smaller n", "n")
    try:
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k,
                                top_p=None if body.top_p == 1.0 else body.top_p)
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    try:
        ids = [validate_request(model.tokenizer, p, body.max_tokens, limits.max_new_tokens, limits.max_prompt_tokens)
               for p in prompts]
    except ValueError as e:
        raise RequestError(400, str(e), "prompt") from None
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    return Work(ids, body.n, body.max_tokens, params, stops, seed, body.stream)


def make_request(work: Work, limits: Limits) -> Request:
    """The model loop's view of the work: one sequence per prompt and completion, each with its ticket."""
    request = Request([], asyncio.get_running_loop(), deadline=time.monotonic() + limits.max_request_seconds)
    for i, ids in enumerate(work.ids):
        for j in range(work.n):
            ticket = Ticket(request, i * work.n + j)
            request.sequences.append(Sequence(ids, work.max_tokens, work.params, work.seed + j, work.stops, tag=ticket))
    return request


def predict(scheduler: Scheduler, work: Work, limits: Limits) -> Request:
    """Hand the work to the model loop; its events arrive on the returned request's queue."""
    request = make_request(work, limits)
    try:
        scheduler.submit(request)
    except QueueFull:
        raise RequestError(429, f"the server is at its limit of {limits.max_queue} sequences; retry shortly",
                           kind="rate_limit_error", code="queue_full") from None
    except SchedulerDown:
        raise loop_failed(scheduler) from None
    return request


def loop_failed(scheduler: Scheduler) -> RequestError:
    return RequestError(500, f"the model loop has failed (error id {scheduler.error}, in the server's log); restart "
                        "the server", kind="server_error")


def seconds_left(request: Request) -> float:
    """Before a request waiting on a stuck loop is given up."""
    return max(0.0, request.deadline + DEADLINE_GRACE_S - time.monotonic())


async def events(request: Request, scheduler: Scheduler, limits: Limits,
                 disconnected=None) -> AsyncIterator[Event]:
    """The request's events until every sequence has finished; raises RequestError if the loop fails,
    stalls past the deadline, or (when `disconnected` is given) the client goes away."""
    remaining = len(request.sequences)
    try:
        while remaining:
            try:
                event = await asyncio.wait_for(request.events.get(), timeout=min(0.5, seconds_left(request)))
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    raise RequestError(499, "client closed the request") from None
                if seconds_left(request) == 0:
                    late = f"the model loop did not finish this request within {limits.max_request_seconds:g} s"
                    raise RequestError(504, late, kind="server_error", code="timeout") from None
                continue
            if event is None:
                raise loop_failed(scheduler)
            remaining -= event.finished
            yield event
    finally:
        request.cancelled = remaining > 0  # the client went away or the wait gave up: free its slots


def response_head(model_id: str) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": model_id}


def encode_response(head: dict, request: Request, work: Work) -> dict:
    """The whole completion, once every sequence has finished."""
    choices = [{"text": s.text, "index": s.tag.index, "logprobs": None, "finish_reason": s.finish_reason}
               for s in request.sequences]
    prompt_tokens = sum(len(p) for p in work.ids)
    completion_tokens = sum(len(s.generated) for s in request.sequences)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return {**head, "choices": choices, "usage": usage}


def encode_chunk(head: dict, event: Event) -> str:
    """One server-sent event: a piece of one choice's text."""
    reason = event.sequence.finish_reason if event.finished else None
    choice = {"text": event.text, "index": event.sequence.tag.index, "logprobs": None, "finish_reason": reason}
    return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"


def create_app(model: OnnxModel, limits: Limits, model_id: str, api_key: str | None = None) -> FastAPI:
    """The app: the model loop started and stopped with it, the guard, the error handlers and the routes."""
    scheduler = Scheduler(model, limits)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gpt completions", version="1", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, read_timeout=limits.read_timeout,
                       api_key=api_key)
    add_error_handlers(app)
    add_routes(app, scheduler, model, limits, model_id)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: a 400 for a malformed body, the RequestError's own status, and a
    500 with an error id for anything else; the server goes on."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(RequestError)
    async def refused(request, exc: RequestError):
        return exc.response()

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        error_id = log_error(f"{request.method} {request.url.path} failed: {type(exc).__name__}: {exc}", exc)
        return RequestError(500, f"internal error (error id {error_id}, in the server's log)",
                            kind="server_error").response()


def add_routes(app: FastAPI, scheduler: Scheduler, model: OnnxModel, limits: Limits, model_id: str) -> None:
    """GET /health, GET /v1/models, POST /v1/completions (decode_request → predict → encode_*)."""
    created = int(time.time())

    @app.get("/health")
    async def health():
        if not scheduler.healthy:
            return JSONResponse({"status": "unavailable", "error_id": scheduler.error}, status_code=503)
        return {"status": "ok", "model": model_id, "active": scheduler.active}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "gpt"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        work = decode_request(body, model, limits, model_id)
        request = predict(scheduler, work, limits)
        head = response_head(model_id)
        if work.stream:
            return StreamingResponse(stream(head, request, scheduler, limits), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for _ in events(request, scheduler, limits, http.is_disconnected):
            pass
        return encode_response(head, request, work)


async def stream(head: dict, request: Request, scheduler: Scheduler, limits: Limits) -> AsyncIterator[str]:
    """A streaming completion's server-sent events, ending with [DONE], or with an error event once the
    status line has gone out."""
    pieces = events(request, scheduler, limits)
    try:
        async for event in pieces:
            yield encode_chunk(head, event)
    except RequestError as e:
        yield f"data: {json.dumps(error_body(e.message, e.kind, e.param, e.code))}\n\n"
        return
    finally:
        await pieces.aclose()  # a client gone mid-stream frees its slots now, not at garbage collection
    yield "data: [DONE]\n\n"


def validation_error(exc: RequestValidationError) -> RequestError:
    """pydantic's errors as one 400 naming each field, and the first one as `param`."""
    problems, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", []) if p != "body"]
        param = param or (loc[0] if loc else None)
        if err.get("type") == "json_invalid":
            problems.append("the body is not valid JSON")
        elif err.get("type") == "extra_forbidden":
            problems.append(f"unknown field {'.'.join(loc)!r}")
        else:
            problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return RequestError(400, "; ".join(dict.fromkeys(problems)), param)


def check_limits(args: argparse.Namespace) -> str:
    """The first limit flag that makes no sense, as a message; "" when all are fine."""
    for name in ("max_batch", "max_queue", "max_new_tokens_limit", "max_prompt_tokens", "max_connections"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    for name in ("max_request_seconds", "read_timeout"):
        value = getattr(args, name)
        if not (0 < value < float("inf")):
            return f"--{name.replace('_', '-')}={value} must be a positive number of seconds"
    return ""


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve.server",
        description="Serve an export folder over an OpenAI-compatible HTTP API (POST /v1/completions, "
        "GET /v1/models, GET /health) with onnxruntime and continuous batching.",
        epilog="Example: python -m serve.server exports/shakespeare_char_cpu --port 8000",
    )
    parser.add_argument("export_dir")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tf32", action="store_true",
                        help="on CUDA, let fp32 matmuls use TF32 (faster on Ampere and newer; logits then differ "
                        "from the verified fp32 ones by about 1e-3)")
    parser.add_argument("--model", choices=["auto", *VARIANTS], default="auto",
                        help="which exported model (default auto: the fused graph if the folder has one, fp16 on "
                        "cuda; else model.onnx)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    d = Limits()  # the defaults live in one place
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="sequences waiting or running before 429")
    parser.add_argument("--max-new-tokens-limit", type=int, default=d.max_new_tokens,
                        help="the largest max_tokens allowed")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                        help="the longest prompt, in tokens")
    parser.add_argument("--max-request-seconds", type=float, default=d.max_request_seconds)
    parser.add_argument("--read-timeout", type=float, default=d.read_timeout,
                        help=f"seconds a client has to send a request's headers, and then its body "
                        f"(default {d.read_timeout:g})")
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help=f"open connections; past it the longest-idle one is closed (default {d.max_connections})")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY'; prefer setting $GPT_API_KEY, since a flag is "
                        "visible to every local user in the process list (default: $GPT_API_KEY, else no key)")
    parser.add_argument("--model-id", default=None, help="the name clients use (default: the export folder's)")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(sys.argv[1:] if argv is None else argv)

    from serve.manifest import DeviceError, ExportError

    problem = check_limits(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    api_key = args.api_key
    if api_key is not None:
        print("warning: --api-key is visible to every user of this machine in the process list; set GPT_API_KEY "
              "instead", file=sys.stderr)
    else:
        api_key = os.environ.get("GPT_API_KEY") or None
    try:
        model = OnnxModel(args.export_dir, device=args.device, threads=args.threads, variant=args.model,
                          tf32=args.tf32)
        model.warmup()
    except (ExportError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    limits = Limits(max_batch=args.max_batch, max_queue=args.max_queue, max_new_tokens=args.max_new_tokens_limit,
                    max_prompt_tokens=args.max_prompt_tokens, max_request_seconds=args.max_request_seconds,
                    read_timeout=args.read_timeout,
                    max_connections=args.max_connections)
    model_id = args.model_id or os.path.basename(os.path.normpath(args.export_dir))
    app = create_app(model, limits, model_id, api_key)
    cache = ""
    if model.shared_cache:  # allocated once, when the model loop starts
        cache = (f"; a KV cache of {limits.max_batch} slots x {model.block_size} positions, "
                 f"{model.cache_bytes(limits.max_batch) / 2**20:.0f} MB (--max-batch)")
    print(f"serving {model_id} ({model.variant} on {args.device}{cache}) at http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    protocol = ConnectionGuard.configured(limits.read_timeout, limits.max_connections)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, http=protocol)
    return 0


if __name__ == "__main__":
    sys.exit(run())
