"""The model loop: one thread owns the model and decodes every active sequence together.

Between steps it admits waiting sequences (prefilled and spliced into the batch), retires finished
or abandoned ones, and runs one onnxruntime call for all of them (continuous batching). Requests
reach it through `submit`; their text comes back as `Event`s on each request's asyncio queue, and
`None` on that queue means the loop has failed.

Imports no torch.
"""

import asyncio
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from serve.batch import Event, Sequence, make_batch
from serve.runtime import OnnxModel
from serve.scoring import Scorer


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
    prefix_cache_bytes: int = 256 << 20  # computed prompt blocks kept for reuse (serve/prefix.py); 0: none


# A request whose sequences the model loop has not finished this long after its deadline gets a
# 504: the loop ends overdue sequences itself, so this only fires if the loop is stuck.
DEADLINE_GRACE_S = 30.0

# Prompt tokens admitted (prefilled) per step at most, as llama.cpp's server takes prompts in batches
# of 512 between its decoding steps
PREFILL_TOKENS = 512


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
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Ticket:
    """What each sequence carries (as its `tag`): the request it belongs to and its place in the answer."""

    request: Request
    index: int


class Scheduler:
    """Owns the model: admits, steps and retires sequences in a thread of its own."""

    def __init__(self, model: OnnxModel, limits: Limits):
        self.model, self.limits = model, limits
        self.batch = make_batch(model, slots=limits.max_batch, prefix_bytes=limits.prefix_cache_bytes)
        self.scorer = Scorer(model)  # the prompts' logprobs, for echo
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Condition()
        self.active = 0  # sequences waiting or in the batch
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.stopping = False
        self.error: str | None = None

    def start(self) -> None:
        self.batch.warm()  # before /health says ready: the cache committed, the first prefill's memory grown
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
        request = seq.tag.request
        request.loop.call_soon_threadsafe(request.events.put_nowait, event)

    @staticmethod
    def _deliver_step(events: list[Event]) -> None:
        """A step's events in one hand-over per event loop: one wake-up, not one per sequence."""
        by_loop: dict[Any, list[tuple[Any, Event]]] = {}
        for event in events:
            request = event.sequence.tag.request
            by_loop.setdefault(request.loop, []).append((request.events, event))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _take(self, room: int) -> list[Sequence]:
        """The waiting sequences to admit this step (under the lock): while there is room, and while
        their prompts come to at most PREFILL_TOKENS (one at least), so the sequences decoding meanwhile
        wait for one step's worth of prefill, not for every prompt that arrived at once. Prompts that
        are only scored count for nothing: they never join the batch, and are scored together."""
        admit, budget = [], PREFILL_TOKENS
        while self.waiting and len(admit) < room and (budget > 0 or not admit):
            s = self.waiting.popleft()
            admit.append(s)
            budget -= 0 if s.score_prompt and s.max_new_tokens <= 1 else len(s.prompt_ids)
        return admit

    def _admit(self, sequences: list[Sequence]) -> list[Event]:
        """Score the prompts that asked for it (echo with logprobs), all in one batch of windows; finish
        those that want no new token, and those that want one from the logits the scoring read (an
        evaluation client's requests); prefill the others into the batch. The finished ones' events."""
        scoring = [s for s in sequences if s.score_prompt]
        if scoring:
            top = max(s.logprobs or 0 for s in scoring)
            scores = self.scorer.score_many([s.prompt_ids for s in scoring], top=top,
                                            next_token=[s.max_new_tokens == 1 for s in scoring])
            for s, result in zip(scoring, scores):
                result.keep_top(s.logprobs)
                s.prompt_scores = result
        events, decode = [], []
        for s in sequences:
            if s.max_new_tokens == 0:
                s.finish_reason = "length"
                events.append(Event(s, "", True))
            elif s.prompt_scores is not None and s.prompt_scores.next_logits is not None:
                events.append(s.step(s.prompt_scores.next_logits, self.model.tokenizer))  # its one token
            else:
                decode.append(s)
        self.batch.add(decode)
        return events

    def _run(self) -> None:
        admit: list[Sequence] = []
        try:
            while True:
                with self.lock:
                    while not self.stopping and not self.waiting and not len(self.batch):
                        self.lock.wait()
                    if self.stopping:
                        return
                    admit = self._take(self.limits.max_batch - len(self.batch))
                now = time.monotonic()
                # retire sequences whose client went away or whose time is up
                dropped = [s for s in self.batch.sequences if s.tag.request.cancelled or now > s.tag.request.deadline]
                for s in dropped:
                    if not s.tag.request.cancelled:
                        s.finish_reason = "length"
                        self._deliver(s, Event(s, s.take_text(), True))
                self.batch.remove(dropped)
                gone = [s for s in admit if s.tag.request.cancelled]  # abandoned while waiting
                scored = self._admit([s for s in admit if not s.tag.request.cancelled])
                released = len(dropped) + len(gone)
                events = scored + (self.batch.emit() if len(self.batch) else [])
                finished = sum(event.finished for event in events)
                # hand out the text before the next forward pass
                self._deliver_step([event for event in events if event.text or event.finished or event.logprob])
                self.batch.advance()
                with self.lock:
                    self.active -= finished + released
                    # sequences cancelled before they were admitted
                    stale = [s for s in self.waiting if s.tag.request.cancelled]
                    for s in stale:
                        self.waiting.remove(s)
                    self.active -= len(stale)
        except Exception as e:  # /health turns 503 and requests get 500 with an id; the log has the rest
            error_id = log_error(f"the model loop failed: {type(e).__name__}: {e}", e)
            with self.lock:  # wake every request still waiting, so none hangs
                self.error = error_id
                pending = list(self.waiting) + admit + list(self.batch.sequences)
                self.waiting.clear()
            for request in {id(s.tag.request): s.tag.request for s in pending}.values():
                request.loop.call_soon_threadsafe(request.events.put_nowait, None)


def _put_all(items: list[tuple[Any, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
