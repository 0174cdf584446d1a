"""Generation with onnxruntime alone: the exported graph, a KV cache, and a batch of sequences.

`OnnxModel` wraps one session. Inputs and outputs go through IO binding, so the cache (`present`
of one step is `past_key_values` of the next) stays where the model runs, on the GPU with CUDA,
and only the last logits come back to the host.

`Batch` decodes many sequences in one call per step. Sequences are left-padded: the attention
mask marks real tokens, and each sequence's positions count its own real tokens, so a sequence
gets the same logits in a batch as alone. Sequences join (prefilled, then spliced in), leave
(finished) and refill their window past `block_size` (the `gpt.sampling.refill_context` policy of
the PyTorch reference) between steps. The server's continuous batching is this class.

Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt.sampling import SamplingParams, refill_context, sample
from gpt.tokenizer import StreamDecoder, Tokenizer
from serve.manifest import DeviceError, ExportError, manifest_tokenizer, model_path, read_manifest


def _ort():
    import onnxruntime

    return onnxruntime


class OnnxModel:
    """One onnxruntime session over an export folder, with the cache kept on the device."""

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int = 0, variant: str = "fp32",
                 tf32: bool = False):
        ort = _ort()
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(export_dir)
        self.tokenizer = manifest_tokenizer(export_dir, self.manifest)
        config = self.manifest["model"]
        self.num_layers, self.num_heads = config["num_layers"], config["num_heads"]
        self.head_dim = config["embedding_dim"] // config["num_heads"]
        self.block_size, self.vocab_size = config["block_size"], config["vocab_size"]
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        self.output_names = [o["name"] for o in self.manifest["outputs"]]
        if device not in ("cpu", "cuda"):
            raise DeviceError(f"device {device!r} is unknown: use cpu or cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError(
                "device cuda needs onnxruntime-gpu, and this onnxruntime has only "
                f"{', '.join(ort.get_available_providers())}: "
                'pip uninstall -y onnxruntime && pip install "onnxruntime-gpu[cuda,cudnn]"'
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # onnxruntime's CUDA provider uses TF32 for fp32 matmuls unless told not to: off by default,
        # so an fp32 model gives the logits (and the tokens) that the parity checks compare.
        cuda = ("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"})
        providers = [cuda, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.variant, self.tf32 = variant, tf32
        self.session = ort.InferenceSession(str(model_path(export_dir, self.manifest, variant)), options,
                                            providers=providers)
        # What is built in is not what a session gets: without the CUDA and cuDNN libraries
        # onnxruntime-gpu quietly falls back to the CPU. Check what this session really runs on.
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise DeviceError(
                "onnxruntime-gpu could not start its CUDA provider, so the session fell back to the CPU: it needs "
                "the CUDA 12 and cuDNN 9 libraries (libcudart.so.12, libcublasLt.so.12, libcudnn.so.9) on the "
                'library path; pip install "onnxruntime-gpu[cuda,cudnn]" brings them (onnxruntime\'s log above '
                "names the one it missed)"
            )
        self.device = device
        self._check_graph()

    def _check_graph(self) -> None:
        """The graph must be the one the manifest describes, or decoding fails later for every client."""
        graph_inputs = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if graph_inputs != self.input_names or graph_outputs != self.output_names:
            raise ExportError(f"{self.export_dir}: the {self.variant} graph's inputs and outputs differ from the "
                              "manifest's; the folder mixes two exports: export again")
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != self.vocab_size:
            raise ExportError(f"{self.export_dir}: the {self.variant} graph gives {width} logits per token but the "
                              f"vocabulary has {self.vocab_size} tokens; the folder mixes two exports: export again")

    def warmup(self) -> None:
        """A short batched generation through every code path (prefill, splice, decode, sampling),
        so the first real request does not pay for initialisation."""
        batch = Batch(self)
        batch.add([Sequence([0, 0], 3, SamplingParams(temperature=1.0)), Sequence([0], 3, SamplingParams(greedy=True))])
        while len(batch):
            batch.step()

    # cache helpers: the cache is a list of 2 * num_layers OrtValues, each (B, H, P, D)
    def to_device(self, arrays: Iterable[np.ndarray]) -> list[Any]:
        ort = _ort()
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0) for a in arrays]

    def to_host(self, cache: list[Any]) -> list[np.ndarray]:
        return [v.numpy() for v in cache]

    def empty_cache(self, batch: int) -> list[Any]:
        shape = (batch, self.num_heads, 0, self.head_dim)
        return self.to_device(np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers))

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One forward: logits (B, T, V) on the host, the extended cache on the device."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.input_names[3:], past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])


def validate_request(tokenizer: Tokenizer, prompt: str, max_new_tokens: int, limit: int,
                     max_prompt_tokens: int = 1 << 16) -> list[int]:
    """Token ids of a prompt, or a one-line ValueError naming what is wrong. Limits count tokens."""
    if not isinstance(prompt, str) or prompt == "":
        raise ValueError("prompt is empty: give at least one character, e.g. 'ROMEO:'")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer from 1 to {limit}")
    ids = tokenizer.encode(prompt)
    if len(ids) > max_prompt_tokens:
        raise ValueError(f"prompt has {len(ids)} tokens, over the limit of {max_prompt_tokens}: send a shorter one "
                         "(the model sees at most its block_size of them anyway)")
    return ids


@dataclass
class Sequence:
    """One prompt being continued, with its own sampling settings and random stream."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    tag: Any = None  # the caller's handle (request id, index)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None  # "stop" or "length" once finished
    context: list[int] = field(default_factory=list)  # tokens the cache covers, plus the one to feed next
    decoder: StreamDecoder | None = None  # ids to complete characters (a token may end mid-character)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may be forming

    def accept(self, token: int, piece: str) -> None:
        self.generated.append(token)
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        for s in self.stop:
            at = self.text.find(s, start)
            if at != -1:  # the stop string is not part of the completion
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return
        if len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"

    def take_text(self) -> str:
        """The text not yet handed out, holding back a possible start of a stop string."""
        upto = len(self.text) if self.finish_reason else max(self.emitted, len(self.text) - self._hold)
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece


@dataclass
class Event:
    sequence: Sequence
    text: str  # new text (may be empty)
    finished: bool


class Batch:
    """Sequences decoded together, one onnxruntime call per step."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.sequences: list[Sequence] = []
        self.cache: list[Any] | None = None  # on the device, (B, H, W, D)
        self.mask = np.zeros((0, 0), dtype=np.int64)  # (B, W): 1 where the cache holds a real token
        self.logits = np.zeros((0, model.vocab_size), dtype=np.float32)  # (B, V): next-token logits

    def __len__(self) -> int:
        return len(self.sequences)

    # --- building the batch ----------------------------------------------------------------------

    def _prefill(self, contexts: list[list[int]]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Run left-padded contexts from an empty cache: (host cache, mask, last logits)."""
        width = max(len(c) for c in contexts)
        B = len(contexts)
        if width == 0:
            shape = (B, self.model.num_heads, 0, self.model.head_dim)
            return ([np.zeros(shape, np.float32) for _ in range(2 * self.model.num_layers)],
                    np.zeros((B, 0), np.int64), np.zeros((B, self.model.vocab_size), np.float32))
        ids = np.zeros((B, width), np.int64)
        mask = np.zeros((B, width), np.int64)
        for i, c in enumerate(contexts):
            if c:
                ids[i, width - len(c):] = c
                mask[i, width - len(c):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        logits, present = self.model.run(ids, mask, positions, self.model.empty_cache(B))
        return self.model.to_host(present), mask, logits[:, -1]

    @staticmethod
    def _pad_left(arrays: list[np.ndarray], mask: np.ndarray, width: int) -> tuple[list[np.ndarray], np.ndarray]:
        extra = width - mask.shape[1]
        if extra == 0:
            return arrays, mask
        padded = [np.concatenate([np.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype), a], axis=2) for a in arrays]
        return padded, np.concatenate([np.zeros((mask.shape[0], extra), mask.dtype), mask], axis=1)

    def _host_state(self) -> list[np.ndarray]:
        return self.model.to_host(self.cache) if self.cache is not None else []

    def _set_state(self, host: list[np.ndarray], mask: np.ndarray) -> None:
        # drop leading columns that are padding for every sequence, so the cache is only as wide as needed
        keep = int(np.argmax(mask.any(axis=0))) if mask.size and mask.any() else mask.shape[1]
        host, mask = [a[:, :, keep:] for a in host], mask[:, keep:]
        self.cache, self.mask = (self.model.to_device(host) if self.sequences else None), mask

    def add(self, sequences: list[Sequence]) -> None:
        """Prefill new sequences together and splice them into the batch."""
        if not sequences:
            return
        for s in sequences:
            s.context = list(s.prompt_ids[-self.model.block_size:])
        host_new, mask_new, logits_new = self._prefill([s.context for s in sequences])
        if self.sequences:
            host_old, mask_old = self._host_state(), self.mask
            width = max(mask_old.shape[1], mask_new.shape[1])
            host_old, mask_old = self._pad_left(host_old, mask_old, width)
            host_new, mask_new = self._pad_left(host_new, mask_new, width)
            host = [np.concatenate([a, b], axis=0) for a, b in zip(host_old, host_new)]
            mask = np.concatenate([mask_old, mask_new], axis=0)
            self.logits = np.concatenate([self.logits, logits_new], axis=0)
        else:
            host, mask, self.logits = host_new, mask_new, logits_new
        self.sequences += sequences
        self._set_state(host, mask)

    def remove(self, sequences: Iterable[Sequence]) -> None:
        gone = {id(s) for s in sequences}
        keep = [i for i, s in enumerate(self.sequences) if id(s) not in gone]
        if len(keep) == len(self.sequences):
            return
        host = [a[keep] for a in self._host_state()]
        self.sequences = [self.sequences[i] for i in keep]
        self.logits = self.logits[keep]
        self._set_state(host, self.mask[keep])

    # --- decoding --------------------------------------------------------------------------------

    # A step is emit() then advance(). Between them every remaining sequence has a sampled token
    # waiting to be fed; outside them every sequence has its next-token logits ready, and only then
    # may sequences be added or removed. Callers hand out emit()'s text before advance() runs the
    # model, so a token reaches its reader without waiting for the next forward pass.

    def step(self) -> list[Event]:
        """Sample one token for every sequence, retire the finished ones, and run the model once."""
        events = self.emit()
        self.advance()
        return events

    def emit(self) -> list[Event]:
        """Sample one token for every sequence and retire the finished ones."""
        events, finished = [], []
        tokenizer = self.model.tokenizer
        for i, s in enumerate(self.sequences):
            token = sample(self.logits[i], s.params, s.rng)
            if s.decoder is None:
                s.decoder = tokenizer.stream()
            if token == tokenizer.eot_id:  # the model ended the document: a natural stop, no text
                s.generated.append(token)
                s.finish_reason = "stop"
            else:
                s.accept(token, s.decoder.feed(token))
            if s.finish_reason == "length":
                s.text += s.decoder.flush()  # a character cut off by the limit shows as U+FFFD
            events.append(Event(s, s.take_text(), s.finish_reason is not None))
            if s.finish_reason:
                finished.append(s)
            else:
                s.context.append(token)
        self.remove(finished)
        return events

    def advance(self) -> None:
        """Feed every sequence its sampled token: one model call for the whole batch."""
        if not self.sequences:
            return
        # A sequence whose window is full restarts its cache from the last half of its context
        # (everything but the token fed below), as the PyTorch reference does.
        full = [i for i, s in enumerate(self.sequences) if len(s.context) > self.model.block_size]
        if full:
            for i in full:
                s = self.sequences[i]
                s.context = refill_context(s.context, self.model.block_size)
            host, mask = self._host_state(), self.mask
            host_new, mask_new, _ = self._prefill([self.sequences[i].context[:-1] for i in full])
            width = max(mask.shape[1], mask_new.shape[1])
            host, mask = self._pad_left(host, mask, width)
            host_new, mask_new = self._pad_left(host_new, mask_new, width)
            for j, i in enumerate(full):
                for a, b in zip(host, host_new):
                    a[i] = b[j]
                mask[i] = mask_new[j]
            self._set_state(host, mask)

        ids = np.array([[s.context[-1]] for s in self.sequences], np.int64)  # (B, 1)
        positions = np.array([[len(s.context) - 1] for s in self.sequences], np.int64)  # (B, 1)
        mask = np.concatenate([self.mask, np.ones((len(self.sequences), 1), np.int64)], axis=1)
        logits, self.cache = self.model.run(ids, mask, positions, self.cache)
        self.mask, self.logits = mask, logits[:, -1]


def generate(model: OnnxModel, prompts: list[str] | str, max_new_tokens: int, params: SamplingParams | None = None,
             seed: int = 0, stop: list[str] | None = None, limit: int = 100_000) -> Iterator[Event]:
    """Continue one prompt or a batch of prompts, yielding text as it is generated.

    Every prompt draws from its own random stream seeded with `seed`, so a prompt gives the same
    text in a batch as alone.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    params = params or SamplingParams()
    ids = [validate_request(model.tokenizer, p, max_new_tokens, limit) for p in prompts]
    batch = Batch(model)
    batch.add([Sequence(p, max_new_tokens, params, seed, list(stop or []), tag=i) for i, p in enumerate(ids)])
    while len(batch):
        yield from batch.emit()  # the text goes out before the next forward pass
        batch.advance()
