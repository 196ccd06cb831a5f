"""The README and docs/*.md stay true: their commands parse, their Python runs, their links resolve.

Whatever the pages say is parsed fresh at every run, so a rewritten page is checked the same way:
- every ``alphagrpo ...`` / ``verifier-engine ...`` command line, in fenced code blocks (not ``text`` blocks, which
  hold output) and in inline code, is walked against the real parser (``build_parser()``): the subcommands must
  exist, every flag must exist exactly (no abbreviations), values must pass the flag's type and choices, and the
  line must then parse with ``parse_args``. Placeholders stand for values: ``PATH``, ``DIR``, ``URL``, ``N`` (any
  all-capital word), ``<...>``, ``...``; alternatives ``a|b`` and ``{a,b}`` are each checked. Inline code may leave
  out required flags; a fenced block may not. ``--set KEY=VALUE`` keys must be fields of ``TrainConfig`` and
  concrete values must be accepted by the command's recipe;
- every fenced ``python`` block runs (no GPU, no weights). A block whose first line is ``# not run`` is only
  compiled. A block that uses names it does not define (say, tensors the reader brings) runs its imports, and every
  attribute it takes from an imported name must exist;
- every relative link (``[..](path)``, ``![..](path)``) names a file that exists, and its ``#anchor`` a heading of
  that page; the results files and ``python -m`` modules that docs/*.md cite exist;
- docs/cli.md's generated reference is current (``python docs/gen_cli.py``).
"""
from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import dataclasses
import glob
import io
import itertools
import re
import shlex
import sys
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]
PROGS = ("alphagrpo", "verifier-engine")
WRAPPERS = {"$", "time", "/usr/bin/time", "nohup", "exec", "command"}
MODULES = {"alphagrpo.cli": "alphagrpo", "verifier_engine.cli": "verifier-engine"}


# ---- reading pages -------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def split_page(text: str):
    """``(blocks, prose)``: fenced blocks as ``(lang, first line number, body)``, and the prose lines outside them as
    ``(line number, text)``."""
    blocks, prose = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            fence, lang, start = m.group(2), m.group(3).lower(), i + 1
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence[:3]):
                body.append(lines[i])
                i += 1
            blocks.append((lang, start + 1, "\n".join(body)))
        else:
            prose.append((i + 1, lines[i]))
        i += 1
    return blocks, prose


INLINE = re.compile(r"(`+)(.+?)\1")


def inline_code(prose):
    for lineno, line in prose:
        for m in INLINE.finditer(line):
            yield lineno, m.group(2).strip()


def _logical_lines(body: str):
    """Shell lines with ``\\`` continuations joined: ``(offset, line)``."""
    buf, start = "", None
    for k, line in enumerate(body.splitlines()):
        if start is None:
            start = k
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf, start = "", None
    if buf:
        yield start, buf


def _tokens(line: str, comments: bool = True) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    if not comments:
        lex.commenters = ""
    try:
        return list(lex)
    except ValueError:            # unbalanced quotes: not a command line
        return []


def commands_in(tokens: list[str]):
    """The ``alphagrpo`` / ``verifier-engine`` invocations in a shell token list (split at ``;``, ``&&``, ``|``)."""
    seg: list[str] = []
    for t in tokens + [";"]:
        if t and set(t) <= set(";&|"):
            while seg and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", seg[0]) or seg[0] in WRAPPERS):
                seg.pop(0)
            if len(seg) > 2 and re.fullmatch(r"(.*/)?python[\d.]*", seg[0]) and seg[1] == "-m" and seg[2] in MODULES:
                seg = [MODULES[seg[2]]] + seg[3:]     # python -m alphagrpo.cli ...
            if seg and (seg[0] in PROGS or re.search(r"/bin/(alphagrpo|verifier-engine)$", seg[0])):
                yield seg[0].rsplit("/", 1)[-1], seg[1:]
            seg = []
        else:
            seg.append(t)


def collect_commands():
    out = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        blocks, prose = split_page(page.read_text())
        for lang, first, body in blocks:
            if lang in ("text", "python", "json", "console", "output"):
                continue
            for off, line in _logical_lines(body):
                for prog, args in commands_in(_tokens(line)):
                    out.append(pytest.param(prog, args, True, id=f"{rel}:{first + off}"))
        for lineno, code in inline_code(prose):
            if code.split(" ", 1)[0] in PROGS:
                for prog, args in commands_in(_tokens(code, comments=False)):
                    if args:
                        out.append(pytest.param(prog, args, False, id=f"{rel}:{lineno}"))
    return out


# ---- checking one command ------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def parser_for(prog: str) -> argparse.ArgumentParser:
    if prog == "alphagrpo":
        from alphagrpo.cli import build_parser
    else:
        from verifier_engine.cli import build_parser
    return build_parser()


def is_placeholder(tok: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*|\.\.\.|…|.*<[^>]+>.*|.*\.\.\..*", tok))


def alternatives(tok: str):
    """``a|b`` or ``{a,b}`` -> ``[a, b]``; anything else -> None."""
    if re.fullmatch(r"\{[^{}]+,[^{}]+\}", tok):
        return tok[1:-1].split(",")
    if "|" in tok and not tok.startswith("-") and "://" not in tok:
        return tok.split("|")
    return None


def _subparsers(p: argparse.ArgumentParser):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a
    return None


class DocCommandError(AssertionError):
    pass


def _placeholder_value(action: argparse.Action) -> str:
    if action.choices:
        return str(list(action.choices)[0])
    if action.type is not None:
        for v in ("1", "1.0", "http://127.0.0.1:8000", "x"):
            try:
                action.type(v)
                return v
            except Exception:
                continue
    return "x"


def check_sets(prog: str, recipe: str | None, sets: list[str]) -> None:
    """``--set`` keys are ``TrainConfig`` fields; concrete values are accepted by the recipe."""
    from alphagrpo.train.config import TrainConfig, apply_overrides, get_recipe
    concrete, any_placeholder = [], False
    for item in sets:
        if is_placeholder(item) or item.startswith("KEY="):
            any_placeholder = True
            continue
        if "=" not in item:
            raise DocCommandError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        obj = TrainConfig()
        for part in key.split("."):
            names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
            if part not in names:
                raise DocCommandError(f"--set {item!r}: {key!r} is not a TrainConfig field")
            obj = getattr(obj, part)
        if is_placeholder(value) or alternatives(value):
            any_placeholder = True
        else:
            concrete.append(item)
    try:
        apply_overrides(get_recipe(recipe or "tiny_shapes"), concrete)
    except ValueError as e:
        if not any_placeholder:
            raise DocCommandError(f"--set values refused by recipe {recipe or 'tiny_shapes'}: {e}") from None


def check_command(prog: str, args: list[str], strict: bool = True) -> None:
    """Raise ``DocCommandError`` when ``prog args`` does not parse (see the module docstring)."""
    parser = parser_for(prog)
    out: list[str] = []
    sets: list[str] = []
    recipe = None
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok in ("...", "…"):
            continue
        if tok.startswith("-") and not re.fullmatch(r"-\d+(\.\d*)?(e-?\d+)?", tok):
            if tok == "--":
                break
            name, eq, inline_value = tok.partition("=")
            action = parser._option_string_actions.get(name)
            if action is None:
                raise DocCommandError(f"{parser.prog}: unknown flag {name!r}")
            if isinstance(action, argparse._HelpAction):
                return
            if action.nargs == 0:
                if eq:
                    raise DocCommandError(f"{parser.prog}: flag {name} takes no value")
                out.append(name)
                continue
            if eq:
                value = inline_value
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise DocCommandError(f"{parser.prog}: flag {name} needs a value")
            if name == "--set":
                sets.append(value)
            alts = alternatives(value)
            if alts and action.choices:
                bad = [a for a in alts if a not in action.choices]
                if bad:
                    raise DocCommandError(f"{parser.prog} {name}: {bad} not among {list(action.choices)}")
                value = alts[0]
            elif is_placeholder(value) or (alts and action.type is not None):
                value = _placeholder_value(action)
            if name == "--recipe" and not is_placeholder(args[i - 1]):
                recipe = value
            out += [name, value]
            continue
        sub = _subparsers(parser)
        if sub is not None:
            alts = alternatives(tok)
            names = alts if alts else [tok]
            if is_placeholder(tok):
                return
            bad = [n for n in names if n not in sub.choices]
            if bad:
                raise DocCommandError(f"{parser.prog}: unknown command {bad[0]!r} (choose from {list(sub.choices)})")
            if alts:                      # {demo,train,...}: each exists; nothing more to follow
                return
            out.append(tok)
            parser = sub.choices[tok]
            continue
        out.append("x" if is_placeholder(tok) else tok)   # a positional argument
    if sets:
        check_sets(prog, recipe, sets)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser_for(prog).parse_args(out)
    except SystemExit as e:
        msg = " ".join(err.getvalue().split())
        if e.code == 0:
            return
        if not strict and "arguments are required" in msg:
            return
        raise DocCommandError(f"{prog} {' '.join(out)}: {msg}") from None


@pytest.mark.parametrize("prog,args,strict", collect_commands())
def test_command_parses(prog, args, strict):
    check_command(prog, args, strict)


@pytest.mark.parametrize("line", [
    "alphagrpo train --recipe tiny_shapes --no-such-flag",
    "alphagrpo train --step 40",                        # an abbreviation argparse would accept: not in the docs
    "alphagrpo trian --steps 40",
    "alphagrpo train --set optim.learning_rate=1e-4",
    "alphagrpo train --set optim.lr=fast",
    "alphagrpo ablate --study fpr|speed --seeds 0",
    "alphagrpo eval --n many",
    "alphagrpo data synth --bogus 1",
    "verifier-engine serve --backend native --model /m --port 8000 --bogus",
    "verifier-engine serve --backend tensorflow --model /m",
    "verifier-engine serve --model /m",                 # --backend is required in a fenced block
])
def test_checker_refuses_bad_commands(line):
    prog, *args = shlex.split(line)
    with pytest.raises(DocCommandError):
        check_command(prog, args, strict=True)


def test_checker_accepts_placeholders():
    assert list(commands_in(_tokens("OMP_NUM_THREADS=1 python -m alphagrpo.cli eval --n 8; echo done"))) == [
        ("alphagrpo", ["eval", "--n", "8"])]
    for line in ("alphagrpo ablate --study fpr|scoring|reward --seeds 0,1,2 --steps 20",
                 "alphagrpo demo --seed S --set loss.beta_text=B --rl-eval 8",
                 "alphagrpo pretrain --init DIR --out runs/x --think-drop 0.5 ...",
                 "alphagrpo {demo,pretrain,train,eval,refine,ablate,data}",
                 "verifier-engine make-tiny PATH --size small"):
        prog, *args = shlex.split(line)
        check_command(prog, args, strict=True)
    check_command("verifier-engine", ["serve", "--backend", "trtllm"], strict=False)


# ---- Python blocks -------------------------------------------------------------------------------------------------
def python_blocks():
    out = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        for lang, first, body in split_page(page.read_text())[0]:
            if lang in ("python", "py"):
                out.append(pytest.param(body, id=f"{rel}:{first}"))
    return out


def free_names(tree: ast.AST) -> set[str]:
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else used).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            if not isinstance(node, ast.ClassDef):
                a = node.args
                bound.update(x.arg for x in a.posonlyargs + a.args + a.kwonlyargs)
                bound.update(x.arg for x in (a.vararg, a.kwarg) if x)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return used - bound


def _attr_chain(node: ast.Attribute):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return node.id, parts[::-1]
    return None, []


@pytest.mark.parametrize("body", python_blocks())
def test_python_block_runs(body, tmp_path, monkeypatch):
    first = body.lstrip().splitlines()[0].strip() if body.strip() else ""
    tree = ast.parse(body)
    compile(tree, "<doc>", "exec")
    if first.lower().startswith("# not run"):
        return
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    ns: dict = {"__name__": "__doc_block__"}
    missing = free_names(tree)
    if not missing:
        exec(compile(tree, "<doc>", "exec"), ns)
        return
    # The block uses names the reader brings: run its imports, and check what it takes from them.
    imports = ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    exec(compile(imports, "<doc imports>", "exec"), ns)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            root, parts = _attr_chain(node)
            if root in ns and root not in missing:
                obj = ns[root]
                for p in parts:
                    assert hasattr(obj, p), f"{root}.{'.'.join(parts)}: {obj!r} has no attribute {p!r}"
                    obj = getattr(obj, p)


# ---- links and cited files -----------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    text = re.sub(r"`", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset:
    seen: dict[str, int] = {}
    out = set()
    for _, line in split_page(page.read_text())[1]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    for m in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", page.read_text()):
        out.add(m.group(1))
    return frozenset(out)


def links():
    out = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        for lineno, line in split_page(page.read_text())[1]:
            prose = INLINE.sub("", line)
            for m in LINK.finditer(prose):
                target = m.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):     # http:, https:, mailto:
                    continue
                out.append(pytest.param(page, target, id=f"{rel}:{lineno}:{target}"))
    return out


@pytest.mark.parametrize("page,target", links())
def test_link_resolves(page, target):
    path, _, frag = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.name}: link {target!r} names {dest}, which does not exist"
    if frag and dest.suffix == ".md":
        assert frag in anchors(dest), f"{page.name}: link {target!r}: {dest.name} has no heading #{frag}"


def _expand(pattern: str):
    m = re.search(r"\{([^{}]+)\}", pattern)
    if not m:
        return [pattern]
    return list(itertools.chain.from_iterable(
        _expand(pattern[:m.start()] + alt + pattern[m.end():]) for alt in m.group(1).split(",")))


def cited_files():
    out = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        text = page.read_text()
        for m in re.finditer(r"(?<![\w/.])((?:bench|experiments)/results/[\w.*{},\-]+)", text):
            out.append(pytest.param(m.group(1), "file", id=f"{rel}:{m.group(1)}"))
        for m in re.finditer(r"python -m ([\w.]+)", text):
            out.append(pytest.param(m.group(1), "module", id=f"{rel}:-m {m.group(1)}"))
    return out


@pytest.mark.parametrize("what,kind", cited_files())
def test_cited_file_exists(what, kind):
    if kind == "module":
        sys.path.insert(0, str(ROOT))
        try:
            assert find_spec(what) is not None, f"python -m {what}: no such module"
        finally:
            sys.path.remove(str(ROOT))
        return
    for pattern in _expand(what.rstrip(".,")):
        assert glob.glob(str(ROOT / pattern)), f"{pattern} does not exist"


def test_cli_reference_is_current():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_cli
    finally:
        sys.path.remove(str(ROOT / "docs"))
    page = gen_cli.PAGE.read_text()
    assert gen_cli.splice(page, gen_cli.generate()) == page, "docs/cli.md is not current: run python docs/gen_cli.py"
