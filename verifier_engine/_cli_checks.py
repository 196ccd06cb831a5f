"""The command line's one error policy: any bad input ends with one ``error: <what to change>`` line on stderr and
exit status 2, before any slow work starts (loading a model, binding after loading). Tracebacks only when
``VERIFIER_ENGINE_DEBUG=1``.

Here: a parser whose usage errors print that one line, argparse types for counts, ports, text and URLs, and
``validate(args)``, which checks what argparse cannot (paths, device, token, a free port) and binds the port.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
from urllib.parse import urlsplit

DEBUG_ENV = "VERIFIER_ENGINE_DEBUG"
TOKEN_ENV = "VERIFIER_ENGINE_TOKEN"
log = logging.getLogger("verifier_engine.cli")


class CLIError(Exception):
    """Bad input on the command line; the message says what to change."""


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class Parser(argparse.ArgumentParser):
    """``argparse`` with usage errors as one ``error: ...`` line and exit status 2 (``--help`` still prints usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# ---- argparse types ------------------------------------------------------------------------------------------------
def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {what}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is too small; give {what}")
    return value


def positive_int(text: str) -> int:
    return _int(text, 1, "a whole number >= 1")


def nonneg_int(text: str) -> int:
    return _int(text, 0, "a whole number >= 0")


def port(text: str) -> int:
    value = _int(text, 1, "a port from 1 to 65535")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port; give a port from 1 to 65535")
    return value


def _float(text: str, positive: bool) -> float:
    import math
    what = "a number > 0" if positive else "a number >= 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"{text} is out of range; give {what}")
    return value


def positive_float(text: str) -> float:
    return _float(text, True)


def nonneg_float(text: str) -> float:
    return _float(text, False)


def text(value: str) -> str:
    """Non-blank text that is valid Unicode (bytes that are not UTF-8 arrive as lone surrogates)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the text is empty; give some words")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{value.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 "
                                         f"text; fix the encoding") from None
    return value


def http_url(value: str) -> str:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} has a malformed port; give http://HOST:PORT") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http(s) URL; give http://HOST:PORT")
    return value


# ---- checks of paths, device, token, port --------------------------------------------------------------------------
def check_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise CLIError(f"{what} {path!r} does not exist; give the path of a file")
    if os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is a directory; give the path of a file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{what} {path!r} is not readable; fix its permissions")
    return path


def check_image(path: str) -> str:
    check_file(path, "--image")
    from PIL import Image
    try:
        with Image.open(path) as im:
            fmt = im.format
    except Exception:  # PIL raises many types for files that are not images
        raise CLIError(f"--image {path!r} is not an image; give a PNG or JPEG file") from None
    if fmt not in ("PNG", "JPEG"):
        raise CLIError(f"--image {path!r} is {fmt}; give a PNG or JPEG file")
    return path


def check_model(backend: str, model: str) -> None:
    if backend == "openai":
        if not model.strip():
            raise CLIError("--model is empty; give the model name the OpenAI-compatible server serves")
        return
    if not os.path.isdir(model):
        what = "is a file" if os.path.exists(model) else "does not exist"
        raise CLIError(f"--model {model!r} {what}; give a local model directory (the engine never downloads)")
    if backend in ("hf", "native"):
        config = os.path.join(model, "config.json")
        try:
            with open(config, encoding="utf-8") as f:
                ok = isinstance(json.load(f), dict)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise CLIError(f"--model {model!r} is not a model: it has no readable config.json; give a transformers "
                           f"checkpoint directory")


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def check_device(device: str) -> None:
    if device == "auto":
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device!r} is not a device; give cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise CLIError(f"--device {device}: no CUDA device is visible; give --device cpu")
        if dev.index is not None and dev.index >= n:
            raise CLIError(f"--device {device}: only {n} CUDA device(s) are visible; give cuda:0 to cuda:{n - 1}")
    elif dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {device!r} is not supported; give cpu, cuda, cuda:N or auto")


def check_output_dir(path: str, what: str) -> None:
    """``path`` is (or can be made) a directory this process can write into."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is a file; give a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CLIError(f"{what} {path!r} is not writable ({e.strerror}); give a directory you can write to") from None


def read_token(args) -> str | None:
    """The bearer token: ``--token-file``, else the environment variable, else ``--token`` (visible to other users
    of the machine in the process list, so a warning)."""
    token_file, token = getattr(args, "token_file", None), getattr(args, "token", None)
    if token_file and token:
        raise CLIError("give the token once: --token-file or --token, not both")
    if token_file:
        check_file(token_file, "--token-file")
        try:
            with open(token_file, encoding="utf-8") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--token-file {token_file!r} could not be read ({e}); give a UTF-8 text file") from None
        if not value or any(c.isspace() for c in value):
            raise CLIError(f"--token-file {token_file!r} must hold one token (no spaces), found "
                           f"{'nothing' if not value else 'several words'}")
        return value
    if token is not None:
        if not token.strip() or any(c.isspace() for c in token):
            raise CLIError("--token must be one word without spaces")
        log.warning("--token on the command line is visible to other users of this machine; prefer --token-file or "
                    "the %s environment variable", TOKEN_ENV)
        return token
    value = os.environ.get(TOKEN_ENV, "").strip()
    return value or None


def bind(host: str, port_: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it later); ``CLIError`` when the address is not usable."""
    try:
        infos = socket.getaddrinfo(host, port_, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CLIError(f"--host {host!r} cannot be resolved ({e.strerror}); give an IP address such as "
                       f"127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port_} ({e.strerror}); give another --port, or stop what "
                       f"uses it") from None
    return sock


def validate(args) -> None:
    """Everything checkable before slow work, per command; fills ``args.token`` and, for serve, ``args.sock``."""
    command = args.command
    backend = getattr(args, "backend", None)
    if command == "profile" and not getattr(args, "url", None) and not (backend and args.model):
        raise CLIError("profile needs --url, or --backend and --model")
    if command == "make-tiny":
        check_output_dir(args.path, "the output folder")
        return
    if backend and getattr(args, "model", None) is not None and not (command == "profile" and args.url):
        check_model(backend, args.model)
        if backend in ("hf", "native"):
            if args.dtype not in DTYPES:
                raise CLIError(f"--dtype {args.dtype!r} is not a dtype; give one of {', '.join(DTYPES)}")
            check_device(args.device)
        if getattr(args, "tokenizer", None):
            if not os.path.exists(args.tokenizer):
                raise CLIError(f"--tokenizer {args.tokenizer!r} does not exist; give a local tokenizer directory")
    if command in ("serve", "profile"):
        args.token = read_token(args)
    if command == "score":
        for path in args.image:
            check_image(path)
    if command == "serve":
        args.sock = bind(args.host, args.port)


def report(e: BaseException) -> int:
    """Print the one error line for ``e`` and return the exit status (2: bad input, 1: failed while working)."""
    if isinstance(e, CLIError):
        print(f"error: {e}", file=sys.stderr)
        return 2
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"error: {type(e).__name__}" + (f": {message}" if message else "")
          + f" (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    return 1
