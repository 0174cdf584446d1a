"""An OpenAI-compatible completions server on onnxruntime, with continuous batching and hard limits.

    python -m serve.server EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--max-batch 16] ...

A request goes through three steps, each a function that can be read and tested alone:

    decode_request   the JSON body to `Work` (token ids, sampling settings, seeds), or a RequestError
                     (serve/protocol.py)
    predict          `Work` into the model loop (serve/scheduler.py), and its events back
    encode_*         events to an OpenAI `text_completion` object, or to server-sent events
                     (serve/protocol.py)

Streaming and non-streaming share the first two. POST /v1/chat/completions takes the same path
with messages, rendered by the model's chat template (serve/chat.py). Beside them: GET /v1/models,
GET /health, GET /metrics (serve/metrics.py), and POST /tokenize, POST /detokenize and GET
/tokenizer_info in vLLM's shape (serve/tokenize.py), which evaluation clients use. FastAPI and
uvicorn carry HTTP and validation; serve/guard.py bounds connections, time and bytes; the model
runs in the scheduler's thread.

Imports no torch.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.batch import Event
from serve.chat import (
    ChatCompletionRequest,
    chat_head,
    decode_chat_request,
    encode_chat_chunk,
    encode_chat_response,
)
from serve.generate import warmup
from serve.guard import ConnectionGuard, RequestGuard, error_body
from serve.manifest import VARIANTS
from serve.metrics import CONTENT_TYPE, RequestTimer, ServerMetrics
from serve.playground import add_playground
from serve.protocol import (
    CompletionRequest,
    RequestError,
    Work,
    decode_request,
    encode_chunk,
    encode_response,
    encode_usage_chunk,
    prompt_logprobs,
    response_head,
)
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
from serve.tokenize import add_tokenizer_routes


def make_request(work: Work, limits: Limits) -> Request:
    """The model loop's view of the work: one sequence per prompt and completion, each with its ticket."""
    request = Request([], asyncio.get_running_loop(), deadline=time.monotonic() + limits.max_request_seconds)
    request.sequences = work.sequences(lambda index: Ticket(request, index))
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


# How often a request whose answer is not streamed asks whether its client is still connected
DISCONNECT_POLL_S = 0.5


async def events(request: Request, scheduler: Scheduler, limits: Limits, metrics: ServerMetrics | None = None,
                 disconnected=None) -> AsyncIterator[Event]:
    """The request's events until every sequence has finished; raises RequestError if the loop fails,
    stalls past the deadline, or (when `disconnected` is given) the client goes away."""
    remaining = len(request.sequences)
    timer = RequestTimer(metrics, request)
    look = time.monotonic() + DISCONNECT_POLL_S  # when to ask whether the client is still there
    try:
        while remaining:
            if disconnected is not None and time.monotonic() >= look:  # also while tokens keep coming
                look = time.monotonic() + DISCONNECT_POLL_S
                if await disconnected():
                    raise RequestError(499, "client closed the request")
            try:  # a step's events arrive together: only an empty queue is waited on
                event = request.events.get_nowait() if request.events.qsize() else await asyncio.wait_for(
                    request.events.get(), timeout=min(DISCONNECT_POLL_S, seconds_left(request)))
            except asyncio.TimeoutError:
                if seconds_left(request) == 0:
                    late = f"the model loop did not finish this request within {limits.max_request_seconds:g} s"
                    raise RequestError(504, late, kind="server_error", code="timeout") from None
                continue
            if event is None:
                raise loop_failed(scheduler)
            remaining -= event.finished
            if event.text or event.logprob is not None:
                timer.token(event.sequence)
            yield event
    finally:
        request.cancelled = remaining > 0  # the client went away or the wait gave up: free its slots
        timer.end(request, request.cancelled)


def create_app(model: OnnxModel, limits: Limits, model_id: str, api_key: str | None = None,
               private_metrics: bool = False) -> FastAPI:
    """The app: the model loop started and stopped with it, the guard, the error handlers and the routes.
    /health and /metrics answer without the API key, unless `private_metrics` puts /metrics behind it."""
    scheduler = Scheduler(model, limits)
    metrics = ServerMetrics(scheduler, limits.max_batch)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gpt completions", version="1", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    # the playground's page needs no key (it asks for one); the API it calls does
    open_paths = {"/health", "/", "/static/"} | (set() if private_metrics else {"/metrics"})
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, read_timeout=limits.read_timeout,
                       api_key=api_key, open_paths=open_paths)
    app.add_middleware(metrics.middleware)  # outermost: counts the guard's refusals too
    add_error_handlers(app)
    add_routes(app, scheduler, model, limits, model_id)
    add_tokenizer_routes(app, model, model_id)
    add_playground(app, model, model_id)
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
    """GET /health, /v1/models, /metrics; POST /v1/completions (decode_request → predict → encode_*) and
    /v1/chat/completions (decode_chat_request → predict → encode_chat_*, serve/chat.py)."""
    created = int(time.time())
    metrics: ServerMetrics = app.state.metrics

    @app.get("/health")
    async def health():
        if not scheduler.healthy:
            return JSONResponse({"status": "unavailable", "error_id": scheduler.error}, status_code=503)
        return {"status": "ok", "model": model_id, "active": scheduler.active}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "gpt", "max_model_len": model.block_size}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def answer(work: Work, chunk: Callable[[Event, bool], str], chunk_head: dict,
                     whole: Callable[[list], dict], http: HTTPRequest) -> Response:
        """Predict, then stream the chunks and the usage, or wait and send the whole answer."""
        request = predict(scheduler, work, limits)
        if work.stream:
            return event_stream(stream(request, work, scheduler, limits, metrics, chunk,
                                       lambda: encode_usage_chunk(chunk_head, work, request.sequences)))
        async for _ in events(request, scheduler, limits, metrics, http.is_disconnected):
            pass
        # serialized here, by orjson: FastAPI's generic encoder walks every list of a long logprobs
        # answer, and json.dumps took a tenth of a scoring request's time
        return Response(orjson.dumps(whole(request.sequences)), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        work = decode_request(body, model, limits, model_id)
        head = response_head(model_id)
        return await answer(work, completion_chunks(head, work, model), head,
                            lambda sequences: encode_response(head, model.tokenizer, sequences, work), http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        work = decode_chat_request(body, model, limits, model_id)
        head = chat_head(model_id)
        return await answer(work, lambda event, first: encode_chat_chunk(head, model.tokenizer, event, work, first),
                            {**head, "object": "chat.completion.chunk"},
                            lambda sequences: encode_chat_response(head, model.tokenizer, sequences, work), http)


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def stream(request: Request, work: Work, scheduler: Scheduler, limits: Limits, metrics: ServerMetrics,
                 encode: Callable[[Event, bool], str], usage_chunk: Callable[[], str]) -> AsyncIterator[str]:
    """A streaming answer's server-sent events: `encode(event, first)` for each step (first: the
    sequence's first event), then the usage (if asked for) and [DONE], or an error event once the
    status line has gone out."""
    pieces = events(request, scheduler, limits, metrics)
    seen: set[int] = set()
    try:
        async for event in pieces:
            first = id(event.sequence) not in seen
            seen.add(id(event.sequence))
            yield encode(event, first)
    except RequestError as e:
        yield f"data: {json.dumps(error_body(e.message, e.kind, e.param, e.code))}\n\n"
        return
    finally:
        await pieces.aclose()  # a client gone mid-stream frees its slots now, not at garbage collection
    if work.include_usage:
        yield usage_chunk()
    yield "data: [DONE]\n\n"


def completion_chunks(head: dict, work: Work, model: OnnxModel) -> Callable[[Event, bool], str]:
    """A completion's chunks: with echo, a sequence's first chunk carries its prompt, and the text
    offsets of what follows start after it."""
    shifts: dict[int, int] = {}  # id(sequence) -> length of its echoed prompt

    def encode(event: Event, first: bool) -> str:
        s = event.sequence
        prompt = prompt_logprobs(model.tokenizer, s) if work.echo and first else ("", None)
        if first:
            shifts[id(s)] = len(prompt[0])
        return encode_chunk(head, event, work, prompt, shifts[id(s)])
    return encode


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
    for name in ("max_batch", "max_queue", "max_new_tokens_limit", "max_prompt_tokens", "max_connections",
                 "max_prompts"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    for name in ("max_request_seconds", "read_timeout"):
        value = getattr(args, name)
        if not (0 < value < float("inf")):
            return f"--{name.replace('_', '-')}={value} must be a positive number of seconds"
    if not 0 <= args.prefix_cache_mb < float("inf"):
        return f"--prefix-cache-mb={args.prefix_cache_mb} must be a number of MiB, 0 or more (0 turns reuse off)"
    return ""


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve.server",
        description="Serve an export folder over an OpenAI-compatible HTTP API (POST /v1/completions with "
        "logprobs and echo, POST /v1/chat/completions for a model with a chat template, GET /v1/models, "
        "GET /health, GET /metrics, POST /tokenize and /detokenize) with "
        "onnxruntime and continuous batching.",
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
    parser.add_argument("--max-prompts", type=int, default=d.max_prompts,
                        help=f"prompts in one request (default {d.max_prompts}; an evaluation client's batch_size)")
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
    parser.add_argument("--prefix-cache-mb", type=float, default=d.prefix_cache_bytes / 2**20,
                        help="MiB of computed prompt blocks kept for prompts that start the same way (the fused "
                        f"graph on cpu; default {d.prefix_cache_bytes >> 20}; 0: off)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY'; prefer setting $GPT_API_KEY, since a flag is "
                        "visible to every local user in the process list (default: $GPT_API_KEY, else no key)")
    parser.add_argument("--private-metrics", action="store_true",
                        help="put GET /metrics behind --api-key too (by default it answers without a key, as /health)")
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
        print(model.describe_load(), file=sys.stderr)
        warmup(model)
    except (ExportError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    limits = Limits(max_batch=args.max_batch, max_queue=args.max_queue, max_new_tokens=args.max_new_tokens_limit,
                    max_prompt_tokens=args.max_prompt_tokens, max_request_seconds=args.max_request_seconds,
                    read_timeout=args.read_timeout, max_connections=args.max_connections,
                    max_prompts=args.max_prompts, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
    model_id = args.model_id or os.path.basename(os.path.normpath(args.export_dir))
    app = create_app(model, limits, model_id, api_key, private_metrics=args.private_metrics)
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
