"""``verifier-engine``: serve, score, profile, make-tiny.

    verifier-engine serve   --backend native --model /ckpt/Qwen3-VL-8B-Instruct [--port 8000] [--host 127.0.0.1]
    verifier-engine score   --backend native --model PATH --image a.png --question "Is there a cat?" [...]
    verifier-engine profile --backend native --model PATH [--batch-images 4 --questions 16]
    verifier-engine profile --url http://127.0.0.1:8000 [--concurrency 8 --requests 100 --duration 30]
    verifier-engine make-tiny /tmp/tiny-qwen3vl --family qwen3_vl     (random weights, for trying things out)

The bearer token comes from ``--token-file PATH`` or the ``VERIFIER_ENGINE_TOKEN`` environment variable (``--token``
also works, but shows the token to other users of the machine). ``profile`` and ``score`` print a table, then one
JSON line last. Bad input ends with one ``error: ...`` line and exit status 2 before any model is loaded
(``VERIFIER_ENGINE_DEBUG=1`` shows tracebacks).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ._cli_checks import (TOKEN_ENV, Parser, http_url, nonneg_float, nonneg_int, port, positive_float, positive_int,
                          report, text, validate)


def _add_backend_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from .backends import backend_names
    p.add_argument("--backend", choices=backend_names(), default="native" if not required else None,
                   required=required, help="scoring backend")
    p.add_argument("--model", required=required, help="local model directory (openai: the served model name)")
    p.add_argument("--device", default="auto", help="hf/native: cuda, cpu or auto")
    p.add_argument("--dtype", default="auto", help="hf/native: bfloat16, float16, float32 or auto")
    p.add_argument("--attn", default="sdpa", help="hf/native: transformers attention implementation")
    p.add_argument("--max-images-per-batch", type=positive_int, default=16, help="native: images per prefix pass")
    p.add_argument("--max-suffix-tokens", type=positive_int, default=8192, help="native: suffix tokens per pass")
    p.add_argument("--no-cuda-graphs", action="store_true", help="native: never capture CUDA graphs")
    p.add_argument("--hf-batch-size", type=positive_int, default=1, help="hf: queries per forward")
    p.add_argument("--base-url", action="append", type=http_url,
                   help="openai: server base URL (repeat to balance several)")
    p.add_argument("--openai-mode", choices=("auto", "top_logprobs", "token_ids"), default="auto",
                   help="openai: auto = exact token ids when the server has them (needs --tokenizer), else top-k")
    p.add_argument("--top-logprobs", type=positive_int, default=20,
                   help="openai top_logprobs mode: k; a query with neither yes nor no in the top k counts as failed")
    p.add_argument("--tokenizer", help="openai token_ids/auto mode: local tokenizer path")
    p.add_argument("--on-failure", choices=("zero", "raise"), default="zero", help="openai: failed query policy")


def build_verifier(args):
    from .backends import load_verifier
    if args.backend in ("hf", "native"):
        kw = dict(device=args.device, dtype=args.dtype, attn_implementation=args.attn)
        if args.backend == "native":
            kw.update(max_images_per_batch=args.max_images_per_batch, max_suffix_tokens=args.max_suffix_tokens,
                      cuda_graphs=False if args.no_cuda_graphs else None)
        else:
            kw.update(batch_size=args.hf_batch_size)
        return load_verifier(args.backend, args.model, **kw)
    if args.backend == "openai":
        return load_verifier("openai", args.model, base_url=args.base_url or ["http://127.0.0.1:30000"],
                             mode=args.openai_mode, tokenizer=args.tokenizer, on_failure=args.on_failure,
                             top_logprobs=args.top_logprobs)
    return load_verifier(args.backend, args.model)


def cmd_serve(args) -> int:
    from .server import ServerConfig, serve
    config = ServerConfig(max_batch_images=args.max_batch_images, max_wait_ms=args.max_wait_ms,
                          max_images_per_request=args.max_images_per_request,
                          max_questions_per_image=args.max_questions_per_image, max_pixels=args.max_pixels,
                          max_request_pixels=args.max_request_pixels, max_queue_pixels=args.max_queue_pixels,
                          max_request_bytes=args.max_request_bytes, body_timeout_s=args.body_timeout,
                          token=args.token)
    verifier = build_verifier(args)
    serve(verifier, args.host, args.port, config, backend=args.backend, model=args.model, log_level=args.log_level,
          sock=args.sock)
    return 0


def cmd_score(args) -> int:
    from PIL import Image
    verifier = build_verifier(args)
    images = [Image.open(p).convert("RGB") for p in args.image]
    questions = [list(args.question) for _ in images]
    if args.expected:
        scores = verifier.score(images, questions, [[args.expected] * len(args.question) for _ in images])
    else:
        scores = verifier.score(images, questions)
    for path, row in zip(args.image, scores):
        for q, s in zip(args.question, row):
            print(f"{s:.4f}  {path}  {q}")
    print(json.dumps({"images": args.image, "questions": args.question, "scores": scores}))
    return 0


def cmd_profile(args) -> int:
    from .profiler import format_table, profile_server, profile_verifier
    if args.url:
        result = profile_server(args.url, token=args.token, concurrency=args.concurrency, requests=args.requests,
                                duration=args.duration, batch_images=args.batch_images,
                                questions_per_image=args.questions, image_size=args.image_size,
                                allow_remote=args.allow_remote)
    else:
        if not (args.backend and args.model):
            print("profile needs --url, or --backend and --model", file=sys.stderr)
            return 2
        result = profile_verifier(build_verifier(args), batch_images=args.batch_images,
                                  questions_per_image=args.questions, image_size=args.image_size,
                                  iterations=args.iterations, duration=args.duration, warmup=args.warmup)
    print(format_table(result))
    print(json.dumps(result))
    return 0


def cmd_make_tiny(args) -> int:
    from .testing import make_tiny_model
    make_tiny_model(args.path, family=args.family, size=args.size)
    print(json.dumps({"path": args.path, "family": args.family, "size": args.size}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="verifier-engine", description="fast yes/no scoring of images by VLMs")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve POST /v1/score, /health, /metrics")
    _add_backend_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--token-file", help=f"file holding the bearer token (or set {TOKEN_ENV})")
    p.add_argument("--token", help="bearer token (visible to other users in the process list: prefer --token-file)")
    p.add_argument("--max-batch-images", type=positive_int, default=16, help="dynamic batch: images per backend call")
    p.add_argument("--max-wait-ms", type=nonneg_float, default=5.0, help="dynamic batch: wait for company")
    p.add_argument("--max-images-per-request", type=positive_int, default=64)
    p.add_argument("--max-questions-per-image", type=positive_int, default=64)
    p.add_argument("--max-pixels", type=positive_int, default=4096 * 4096, help="pixels per image")
    p.add_argument("--max-request-pixels", type=positive_int, default=64 * 1024 * 1024, help="pixels per request")
    p.add_argument("--max-queue-pixels", type=positive_int, default=256 * 1024 * 1024, help="pixels queued")
    p.add_argument("--max-request-bytes", type=positive_int, default=64 * 1024 * 1024)
    p.add_argument("--body-timeout", type=positive_float, default=30.0, help="seconds to receive a request body")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="score questions about local images")
    _add_backend_args(p)
    p.add_argument("--image", action="append", required=True, help="PNG/JPEG path (repeatable)")
    p.add_argument("--question", action="append", required=True, type=text, help="question (repeatable)")
    p.add_argument("--expected", choices=("yes", "no"), help="expected answer for every question")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("profile", help="latency/throughput of a backend or of a running server")
    _add_backend_args(p, required=False)
    p.add_argument("--url", type=http_url, help="profile a running server instead of a backend")
    p.add_argument("--token-file", help=f"file holding the server's bearer token (or set {TOKEN_ENV})")
    p.add_argument("--token", help="server bearer token (visible in the process list: prefer --token-file)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    p.add_argument("--batch-images", type=positive_int, default=4, help="images per call / request")
    p.add_argument("--questions", type=positive_int, default=16, help="questions per image")
    p.add_argument("--image-size", type=positive_int, default=448)
    p.add_argument("--iterations", type=positive_int, default=20, help="backend: timed calls at most")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="backend: untimed calls first")
    p.add_argument("--requests", type=positive_int, default=50, help="server: requests at most")
    p.add_argument("--concurrency", type=positive_int, default=4, help="server: requests in flight")
    p.add_argument("--duration", type=positive_float, default=30.0, help="seconds at most")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("make-tiny", help="save a tiny random-weight Qwen-VL verifier (for trying things out)")
    p.add_argument("path")
    p.add_argument("--family", choices=("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"), default="qwen3_vl")
    p.add_argument("--size", choices=("tiny", "small"), default="tiny",
                   help="tiny has attention head dimension 16, which vLLM's CPU attention rejects (it needs >= 32): "
                        "use small to try a real engine")
    p.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2: bad input, one ``error:`` line on stderr; 1: failed later)."""
    from ._cli_checks import debug
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (one line, status 2) and --help (status 0)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    try:
        validate(args)
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line, not a traceback, unless asked for
        if debug():
            raise
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
