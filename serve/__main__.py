"""Generate text from an export folder with onnxruntime, streaming it to stdout; or chat with it (--chat)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from serve.manifest import VARIANTS

MAX_NEW_TOKENS = 100_000


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description="Generate text from an export folder (python -m export) with onnxruntime; no torch needed. "
        "One prompt's text streams to stdout as it is generated; several prompts are decoded together and "
        "printed at the end. Time to first token and tokens/s go to stderr.",
        epilog='Example: python -m serve exports/shakespeare_char_cpu --prompt "ROMEO:" --max-new-tokens 300; '
        "python -m serve exports/chat --chat (a model fine-tuned on conversations: a line of yours, its answer, "
        "and so on until the end of input)",
    )
    parser.add_argument("export_dir")
    parser.add_argument("--prompt", action="append", help="text to continue; repeat for a batch of prompts, decoded "
                        "together")
    parser.add_argument("--chat", action="store_true", help="a conversation in the terminal, through the model's "
                        "chat template: each line you type is a user turn, and the answer streams back")
    parser.add_argument("--system", default=None, help="--chat: a system message that opens the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tf32", action="store_true",
                        help="on CUDA, let fp32 matmuls use TF32 (faster on Ampere and newer; logits then differ "
                        "from the verified fp32 ones by about 1e-3)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--model", choices=["auto", *VARIANTS], default="auto",
                        help="which exported model (default auto: the fused graph if the folder has one, fp16 on "
                        "cuda; else model.onnx)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if bool(args.prompt) == args.chat:
        parser.error("give --prompt TEXT (repeatable), or --chat for a conversation")

    from gpt.cli import run_command
    from serve.manifest import DeviceError, ExportError

    return run_command(lambda: chat(args) if args.chat else generate_to_stdout(args),
                       (ExportError, DeviceError, ValueError))


def chat(args: argparse.Namespace) -> int:
    """Read a user turn a line at a time; stream each answer (the template's end of turn ends it)."""
    from gpt.chat import prompt_ids
    from gpt.sampling import SamplingParams
    from serve.generate import generate, warmup
    from serve.runtime import OnnxModel

    model = OnnxModel(args.export_dir, device=args.device, threads=args.threads, variant=args.model, tf32=args.tf32)
    template = model.tokenizer.chat
    if template is None:
        raise ValueError(f"{args.export_dir} has no chat template: fine-tune on conversations (data.format=chat) and "
                         "export again, or continue text with --prompt")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    warmup(model)
    interactive = sys.stdin.isatty()
    print(f"[{model.describe_load()}; a line is a turn, end of input (Ctrl-D) ends]", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = prompt_ids(model.tokenizer, template, messages)
        answer = ""
        for event in generate(model, [ids], args.max_new_tokens, params, args.seed, args.stop, limit=MAX_NEW_TOKENS):
            answer += event.text
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})


def generate_to_stdout(args: argparse.Namespace) -> int:
    """Load the export, check every prompt, warm up, then generate, timing the first token and the rest."""
    from gpt.sampling import SamplingParams
    from serve.generate import generate, validate_request, warmup
    from serve.runtime import OnnxModel

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy)
    model = OnnxModel(args.export_dir, device=args.device, threads=args.threads, variant=args.model, tf32=args.tf32)
    for prompt in args.prompt:
        validate_request(model.tokenizer, prompt, args.max_new_tokens, MAX_NEW_TOKENS)
    print(f"[{model.describe_load()}]", file=sys.stderr)
    warmup(model)
    events = generate(model, args.prompt, args.max_new_tokens, params, args.seed, args.stop, limit=MAX_NEW_TOKENS)
    try:
        tokens, first, elapsed = write_text(args.prompt, events)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    rate = tokens / (elapsed - first) if tokens > 1 and elapsed > first else 0.0
    print(f"[{model.variant} on {args.device}: {tokens} tokens, time to first token {(first or 0) * 1000:.1f} ms, "
          f"{rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def write_text(prompts: list[str], events) -> tuple[int, float | None, float]:
    """One prompt: its text streams to stdout as it comes. Several: each is printed whole at the end,
    under a header line. Returns (tokens, seconds to the first, seconds in all)."""
    start = time.perf_counter()
    first, tokens = None, 0
    several = len(prompts) > 1
    texts = [""] * len(prompts)
    if not several:
        sys.stdout.write(prompts[0])
    for event in events:
        tokens += 1
        if first is None:
            first = time.perf_counter() - start
        if several:
            texts[event.sequence.tag] += event.text
        else:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    if several:
        for prompt, text in zip(prompts, texts):
            sys.stdout.write(f"--- {prompt!r}\n{prompt}{text}\n")
    else:
        sys.stdout.write("\n")
    return tokens, first, elapsed


if __name__ == "__main__":
    sys.exit(run())
