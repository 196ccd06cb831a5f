"""``alphagrpo data decompose``: free prompts -> yes/no questions in the authors' schema, by an LLM.

    alphagrpo data decompose --llm http://127.0.0.1:8000 --model Qwen2.5-72B-Instruct --in prompts.txt \
        --out data/my_prompts.jsonl

Resumable (rerun: prompts already in --out are skipped), bounded concurrency, bounded retries per prompt; prompts that
never get a well-formed answer are listed and left out. Prints a summary and last one JSON line.
"""
from __future__ import annotations

import json
import logging
import sys


def add_arguments(p) -> None:
    p.add_argument("--llm", required=True, help="OpenAI-compatible server: http://HOST:PORT (or .../v1)")
    p.add_argument("--model", required=True, help="the model name the server serves")
    p.add_argument("--in", dest="inp", metavar="PROMPTS", required=True,
                   help="prompts: a text file (one per line) or a JSONL")
    p.add_argument("--field", default="prompt", help="JSONL: the field holding the prompt (default 'prompt'); other "
                   "fields are kept in the output")
    p.add_argument("--out", required=True, help="output JSONL (appended to; reruns resume)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--retries", type=int, default=2, help="extra attempts per prompt after a malformed answer")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--template", default=None, help="prompt template (default alphagrpo/assets/decompose_prompt.txt)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding a bearer token, "
                   "if the server needs one")


def run(args) -> int:
    from alphagrpo.commands.common import setup_logging
    from alphagrpo.decompose import ChatLLM, api_key_from_env, decompose_file
    setup_logging(logging.WARNING)
    llm = ChatLLM(args.llm, args.model, api_key=api_key_from_env(args.api_key_env), temperature=args.temperature)
    try:
        from tqdm import tqdm
        bar = tqdm(desc="decompose", unit="prompt", disable=not sys.stderr.isatty())
        progress = bar.update
    except ImportError:  # pragma: no cover
        bar, progress = None, None
    s = decompose_file(args.inp, args.out, llm, field_name=args.field, concurrency=args.concurrency,
                       retries=args.retries, template_path=args.template, progress=progress)
    if bar is not None:
        bar.close()
    for f in s.failed:
        print(f"skipped (no well-formed answer after {1 + args.retries} attempts): {f['prompt'][:100]!r}: "
              f"{f['reason']}")
    print(f"decomposed {s.succeeded} prompts, {s.already_done} already in {args.out}, {len(s.failed)} failed, of "
          f"{s.total}")
    print(json.dumps({"out": args.out, **{k: v for k, v in s.to_dict().items() if k != "failures"}}))
    return 0 if not s.failed else 1
