"""An OpenAI-compatible completions server on onnxruntime, with continuous batching and hard limits.

    python -m serve.server EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--max-batch 16] ...

FastAPI and uvicorn carry HTTP, validation and server-sent events. The model runs in one
scheduler thread that owns a `serve.runtime.Batch`: between steps it admits waiting sequences
(prefilled and spliced in), retires finished or abandoned ones, and decodes every active
sequence with one onnxruntime call per step, so concurrent clients share each step instead of
queueing behind each other. The event loop only parses requests and streams text.

Imports no torch.
"""

import argparse
import asyncio
import json
import os
import secrets
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gpt.sampling import SamplingParams
from serve.guard import ConnectionGuard, RequestGuard, error_body
from serve.runtime import Batch, Event, OnnxModel, Sequence, validate_request


@dataclass
class Limits:
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # sequences waiting or running; beyond it requests get 429 at once
    max_new_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_n: int = 8  # completions per prompt
    max_prompts: int = 16  # prompts per request
    max_prompt_tokens: int = 8192  # tokens per prompt (the model reads at most block_size of them)
    max_body_bytes: int = 1 << 20  # counted as received, chunked or not
    max_request_seconds: float = 300.0  # a request still running then ends with what it has
    read_timeout: float = 15.0  # seconds a client has to send its request's headers, and then its body
    max_connections: int = 512  # open connections; past it the longest-idle one is closed


# A request whose sequences the model loop has not finished this long after its deadline gets a
# 504: the loop ends overdue sequences itself, so this only fires if the loop is stuck.
DEADLINE_GRACE_S = 30.0


def log_error(message: str, exc: BaseException) -> str:
    """Write an internal failure, with its traceback, to the server's log; return the id that the
    client is given instead of the text (which may hold paths and internals)."""
    error_id = f"err-{uuid.uuid4().hex[:12]}"
    print(f"[{error_id}] {message}", file=sys.stderr)
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return error_id


class QueueFull(Exception):
    pass


class SchedulerDown(Exception):
    pass


@dataclass
class Request:
    """One HTTP request's sequences and the channel their text comes back on."""

    sequences: list[Sequence]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    deadline: float = 0.0


class Scheduler:
    """Owns the model: admits, steps and retires sequences in a thread of its own."""

    def __init__(self, model: OnnxModel, limits: Limits):
        self.model, self.limits = model, limits
        self.batch = Batch(model)
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Condition()
        self.active = 0  # sequences waiting or in the batch
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.stopping = False
        self.error: str | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=10)

    @property
    def healthy(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def submit(self, request: Request) -> None:
        # Health is checked under the lock that the failure path holds while it sets `error` and
        # collects the requests to wake: a request is either refused here or woken there.
        with self.lock:
            if not self.healthy or self.stopping:
                raise SchedulerDown(self.error or "the model loop is not running")
            if self.active + len(request.sequences) > self.limits.max_queue:
                raise QueueFull()
            self.active += len(request.sequences)
            self.waiting.extend(request.sequences)
            self.lock.notify()

    def _deliver(self, seq: Sequence, event: Event) -> None:
        request: Request = seq.tag[0]
        request.loop.call_soon_threadsafe(request.events.put_nowait, event)

    def _run(self) -> None:
        admit: list[Sequence] = []
        try:
            while True:
                with self.lock:
                    while not self.stopping and not self.waiting and not len(self.batch):
                        self.lock.wait()
                    if self.stopping:
                        return
                    room = self.limits.max_batch - len(self.batch)
                    admit = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                now = time.monotonic()
                # retire sequences whose client went away or whose time is up
                dropped = [s for s in self.batch.sequences if s.tag[0].cancelled or now > s.tag[0].deadline]
                for s in dropped:
                    if not s.tag[0].cancelled:
                        s.finish_reason = "length"
                        self._deliver(s, Event(s, s.take_text(), True))
                self.batch.remove(dropped)
                gone = [s for s in admit if s.tag[0].cancelled]  # abandoned while waiting
                self.batch.add([s for s in admit if not s.tag[0].cancelled])
                released = len(dropped) + len(gone)
                events = self.batch.emit() if len(self.batch) else []
                finished = 0
                for event in events:  # hand out the text before the next forward pass
                    if event.text or event.finished:
                        self._deliver(event.sequence, event)
                    finished += event.finished
                self.batch.advance()
                with self.lock:
                    self.active -= finished + released
                    # sequences cancelled before they were admitted
                    stale = [s for s in self.waiting if s.tag[0].cancelled]
                    for s in stale:
                        self.waiting.remove(s)
                    self.active -= len(stale)
        except Exception as e:  # /health turns 503 and requests get 500 with an id; the log has the rest
            error_id = log_error(f"the model loop failed: {type(e).__name__}: {e}", e)
            with self.lock:  # wake every request still waiting, so none hangs
                self.error = error_id
                pending = list(self.waiting) + admit + list(self.batch.sequences)
                self.waiting.clear()
            for request in {id(s.tag[0]): s.tag[0] for s in pending}.values():
                request.loop.call_soon_threadsafe(request.events.put_nowait, None)


def create_app(model: OnnxModel, limits: Limits, model_id: str, api_key: str | None = None):
    class CompletionRequest(BaseModel):
        """The OpenAI completions request this server understands; any other field is an error."""

        model_config = ConfigDict(extra="forbid")
        model: str | None = None
        prompt: str | list[str]
        max_tokens: int = Field(16, ge=1, le=limits.max_new_tokens)
        temperature: float = Field(1.0, ge=0.0, le=100.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=1)
        seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
        stop: str | list[str] | None = None
        n: int = Field(1, ge=1, le=limits.max_n)
        stream: bool = False
        user: str | None = None  # accepted and ignored, as by OpenAI's server

    scheduler = Scheduler(model, limits)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gpt completions", version="1", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, read_timeout=limits.read_timeout,
                       api_key=api_key)

    def fail(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
             code: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        problems = []
        param = None
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", []) if p != "body"]
            param = param or (loc[0] if loc else None)
            if err.get("type") == "json_invalid":
                problems.append("the body is not valid JSON")
            elif err.get("type") == "extra_forbidden":
                problems.append(f"unknown field {'.'.join(loc)!r}")
            else:
                problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return fail(400, "; ".join(dict.fromkeys(problems)), param)

    def loop_failed() -> JSONResponse:
        return fail(500, f"the model loop has failed (error id {scheduler.error}, in the server's log); restart "
                    "the server", kind="server_error")

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
        if body.model not in (None, model_id):
            return fail(404, f"model {body.model!r} is not served here; this server serves {model_id!r}",
                        "model", code="model_not_found")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > limits.max_prompts:
            return fail(400, f"prompt must be a string or a list of 1 to {limits.max_prompts} strings", "prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            return fail(400, "stop must be up to 4 non-empty strings", "stop")
        try:
            params = SamplingParams(temperature=body.temperature, top_k=body.top_k,
                                    top_p=None if body.top_p == 1.0 else body.top_p)
            ids = [validate_request(model.tokenizer, p, body.max_tokens, limits.max_new_tokens,
                                    limits.max_prompt_tokens) for p in prompts]
        except ValueError as e:
            return fail(400, str(e), "prompt" if "prompt" in str(e) or "vocabulary" in str(e) else None)
        if len(ids) * body.n > limits.max_queue:  # would never fit, however long the client waited
            return fail(400, f"{len(ids)} prompt(s) x n={body.n} is {len(ids) * body.n} sequences, over this "
                        f"server's limit of {limits.max_queue}: send fewer prompts or a smaller n", "n")
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        request = Request([], asyncio.get_running_loop(), deadline=time.monotonic() + limits.max_request_seconds)
        for i, p in enumerate(ids):
            for j in range(body.n):
                index = i * body.n + j
                request.sequences.append(Sequence(p, body.max_tokens, params, seed + j, stops, tag=(request, index)))
        try:
            scheduler.submit(request)
        except QueueFull:
            return fail(429, f"the server is at its limit of {limits.max_queue} sequences; retry shortly",
                        kind="rate_limit_error", code="queue_full")
        except SchedulerDown:
            return loop_failed()
        late = f"the model loop did not finish this request within {limits.max_request_seconds:g} s"

        def overdue() -> float:
            """Seconds left before a request waiting on a stuck loop is given up."""
            return max(0.0, request.deadline + DEADLINE_GRACE_S - time.monotonic())

        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id}
        prompt_tokens = sum(len(p) for p in ids)

        if body.stream:
            async def sse():
                remaining = len(request.sequences)
                try:
                    while remaining:
                        try:
                            event: Event | None = await asyncio.wait_for(request.events.get(), overdue())
                        except asyncio.TimeoutError:
                            yield f"data: {json.dumps(error_body(late, 'server_error'))}\n\n"
                            return
                        if event is None:  # the model loop failed: end the stream with an error
                            failed = error_body(f"the model loop has failed (error id {scheduler.error})",
                                                "server_error")
                            yield f"data: {json.dumps(failed)}\n\n"
                            return
                        index = event.sequence.tag[1]
                        reason = event.sequence.finish_reason if event.finished else None
                        choice = {"text": event.text, "index": index, "logprobs": None, "finish_reason": reason}
                        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
                        remaining -= event.finished
                    yield "data: [DONE]\n\n"
                finally:
                    request.cancelled = remaining > 0  # the client went away: free its slots
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        remaining = len(request.sequences)
        try:
            while remaining:
                try:
                    event = await asyncio.wait_for(request.events.get(), timeout=min(0.5, overdue()))
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return fail(499, "client closed the request")
                    if overdue() == 0:
                        return fail(504, late, kind="server_error", code="timeout")
                    continue
                if event is None:
                    return loop_failed()
                remaining -= event.finished
        finally:
            request.cancelled = remaining > 0
        choices = [{"text": s.text, "index": s.tag[1], "logprobs": None, "finish_reason": s.finish_reason}
                   for s in request.sequences]
        completion_tokens = sum(len(s.generated) for s in request.sequences)
        return {**head, "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                                      "completion_tokens": completion_tokens,
                                                      "total_tokens": prompt_tokens + completion_tokens}}

    # Any other failure is a 500 in OpenAI's shape; the server goes on.
    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        error_id = log_error(f"{request.method} {request.url.path} failed: {type(exc).__name__}: {exc}", exc)
        return fail(500, f"internal error (error id {error_id}, in the server's log)", kind="server_error")

    return app


def run(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--model", choices=["fp32", "int8", "fp16"], default="fp32", help="which exported model")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="sequences waiting or running before 429")
    parser.add_argument("--max-new-tokens-limit", type=int, default=1024, help="the largest max_tokens allowed")
    parser.add_argument("--max-prompt-tokens", type=int, default=8192, help="the longest prompt, in tokens")
    parser.add_argument("--max-request-seconds", type=float, default=300.0)
    parser.add_argument("--read-timeout", type=float, default=15.0,
                        help="seconds a client has to send a request's headers, and then its body (default 15)")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="open connections; past it the longest-idle one is closed (default 512)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY'; prefer setting $GPT_API_KEY, since a flag is "
                        "visible to every local user in the process list (default: $GPT_API_KEY, else no key)")
    parser.add_argument("--model-id", default=None, help="the name clients use (default: the export folder's)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from serve.manifest import ExportError

    for name in ("max_batch", "max_queue", "max_new_tokens_limit", "max_prompt_tokens", "max_connections"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    for name in ("max_request_seconds", "read_timeout"):
        value = getattr(args, name)
        if not (0 < value < float("inf")):
            print(f"error: --{name.replace('_', '-')}={value} must be a positive number of seconds", file=sys.stderr)
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
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    limits = Limits(max_batch=args.max_batch, max_queue=args.max_queue, max_new_tokens=args.max_new_tokens_limit,
                    max_prompt_tokens=args.max_prompt_tokens, max_request_seconds=args.max_request_seconds,
                    read_timeout=args.read_timeout,
                    max_connections=args.max_connections)
    model_id = args.model_id or os.path.basename(os.path.normpath(args.export_dir))
    app = create_app(model, limits, model_id, api_key)
    print(f"serving {model_id} ({args.model} on {args.device}) at http://{args.host}:{args.port}/v1", file=sys.stderr)
    protocol = ConnectionGuard.configured(limits.read_timeout, limits.max_connections)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, http=protocol)
    return 0


if __name__ == "__main__":
    sys.exit(run())
