"""Benchmark suites: each benchmark's own prompt files -> ``Item`` records, and each benchmark's official output
layout, written so that its official scorer runs unchanged on our folder.

- ``geneval``: reads ``evaluation_metadata.jsonl`` (``--variant long``: also its ``_long.jsonl`` rewrite); writes
  ``<index:05d>/metadata.jsonl`` (the line, one JSON object) and ``<index:05d>/samples/<k:04d>.png``.
- ``tiif``: reads ``<split>_prompts/<type>_prompts.jsonl`` (questions from ``<split>_eval_prompts/``); writes
  ``<type>/<model_name>/{short,long}_description/<line>.png``.
- ``dpg``: reads ``dpg_bench_prompts.jsonl`` or ``prompts/<item_id>.txt`` (questions from ``dpg_bench.csv``); writes
  ``<item_id>.png``, the samples tiled 2x2.
- ``wise``: reads WISE's ``*.json`` prompt lists (``prompt_id``, ``Prompt``); writes ``<prompt_id>.png``.
- ``prompts``: reads a JSONL in the authors' schema or a text file of prompts; writes as geneval.

Every item's outputs are written atomically (hidden temporary name, then one rename), so an item is complete exactly
when its final path exists: that is the resume rule. Temporary names start with a dot; GenEval's scorer reads only
digit folders, TIIF's globs ``<line>.*`` (no dotfiles) and WISE's opens ``<prompt_id>.png``, so none sees them.

Each item also carries a ``record`` in the authors' schema (``prompt``, ``semantic_questions`` with an extra
``answer`` key when the expected answer is "no"), used by the judge (``alphagrpo.eval.judge``) and by inference-time
refinement. TIIF's questions are its own; GenEval's, DPG's and WISE's are built here and only feed proxies.
Chose not to: download anything, or guess a file the user did not give (a missing file is an error naming it).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "benchmarks"


@dataclass
class Item:
    """One prompt of a suite. ``key``: stable and unique (resume, per-item seed); ``prompt``: the text drawn;
    ``record``: the authors' schema, for judging; ``meta``: the benchmark's own line; ``hint``: extra text given to a
    thinking model (a record's ``hint`` field, when the file has one)."""
    key: str
    prompt: str
    record: dict
    meta: dict = field(default_factory=dict)
    hint: Optional[str] = None


def _first(folder: Path, names: Sequence[str], what: str) -> Path:
    for n in names:
        if (folder / n).exists():
            return folder / n
    raise FileNotFoundError(f"{what}: none of {list(names)} under {folder}")


def _jsonl(path: Path) -> list:
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{no}: not valid JSON ({e.msg})") from None
    return out


def _png(img: np.ndarray, path: Path) -> None:
    from PIL import Image
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path, format="PNG")


def _atomic_file(path: Path, write) -> None:
    """``write(tmp_path)``, then rename onto ``path`` (a hidden sibling name until then)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_dir(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _q(question: str, tag: str, answer: str = "yes", **extra) -> dict:
    q = {"question": question, "tag": tag, **extra}
    if answer != "yes":
        q["answer"] = answer
    return q


class Suite:
    """A benchmark: ``read`` its prompt files, ``write`` one item's images in its layout, ``load`` them back."""
    name = ""
    variants: tuple = ("default",)
    max_images: Optional[int] = None     # images per prompt the layout can hold (None: any)
    official = ""                        # the official scorer's command, for the docs and the printed hint

    def default_dir(self) -> Optional[Path]:
        d = ASSETS / self.name
        return d if d.is_dir() else None

    def read(self, suite_dir: Path, variant: str) -> list[Item]:
        raise NotImplementedError

    def target(self, out: Path, item: Item) -> Path:
        raise NotImplementedError

    def done(self, out: Path, item: Item) -> bool:
        return self.target(out, item).exists()

    def write(self, out: Path, item: Item, images: Sequence[np.ndarray]) -> None:
        raise NotImplementedError

    def load(self, out: Path, item: Item, n: int) -> list[np.ndarray]:
        """The item's images as drawn (DPG: the tiles cut back out of the grid)."""
        from PIL import Image
        return [np.asarray(Image.open(self.target(out, item)).convert("RGB"))]

    def check(self, variant: str, n: int) -> None:
        if variant not in self.variants:
            raise ValueError(f"--variant {variant!r} is not one of {self.name}'s: {', '.join(self.variants)}")
        if self.max_images is not None and not 1 <= n <= self.max_images:
            raise ValueError(f"{self.name} takes 1..{self.max_images} images per prompt (its layout and scorer), "
                             f"got --n {n}")


class _FolderPerPrompt(Suite):
    """``<index:05d>/metadata.jsonl`` (the prompt's line, one JSON object) + ``samples/<k:04d>.png``."""

    def target(self, out, item):
        return out / item.key

    def write(self, out, item, images):
        def fill(tmp: Path):
            (tmp / "metadata.jsonl").write_text(json.dumps(item.meta) + "\n", encoding="utf-8")
            (tmp / "samples").mkdir()
            for k, img in enumerate(images):
                _png(img, tmp / "samples" / f"{k:04d}.png")
        _atomic_dir(self.target(out, item), fill)

    def load(self, out, item, n):
        from PIL import Image
        files = sorted((self.target(out, item) / "samples").glob("[0-9]*.png"))
        return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def _plural(name: str, count: int) -> str:
    if count == 1:
        return name
    if name.endswith(("s", "sh", "ch", "x")):
        return name + "es"
    return name + "s"


def geneval_questions(meta: dict) -> list[dict]:
    """Yes/no questions equivalent to GenEval's detector checks of one metadata line (a proxy, not the detector)."""
    inc = meta.get("include", [])
    qs = []
    for obj in inc:
        c, n = obj["class"], int(obj.get("count", 1))
        qs.append(_q(f"Is there a {c} in the image?", "Existence") if n == 1 else
                  _q(f"Are there exactly {n} {_plural(c, n)} in the image?", "Count"))
        if obj.get("color"):
            qs.append(_q(f"Is the {c} {obj['color']}?", "Attribute"))
        if obj.get("position"):
            rel, ref = obj["position"]
            qs.append(_q(f"Is the {c} {rel} the {inc[int(ref)]['class']}?", "Spatial"))
    for obj in meta.get("exclude", []):
        c, n = obj["class"], int(obj.get("count", 1))
        qs.append(_q(f"Is there no {c} in the image?", "Negative") if n == 1 else
                  _q(f"Are there fewer than {n} {_plural(c, n)} in the image?", "Count"))
    return qs


class GenEval(_FolderPerPrompt):
    name = "geneval"
    variants = ("short", "long")
    official = ("python evaluation/evaluate_images.py OUT --outfile RESULTS/results.jsonl --model-path "
                "OBJECT_DETECTOR_FOLDER && python evaluation/summary_scores.py RESULTS/results.jsonl")

    def read(self, suite_dir, variant):
        names = ["evaluation_metadata.jsonl", "prompts/evaluation_metadata.jsonl", "prompts_evaluation_metadata.jsonl"]
        metas = _jsonl(_first(suite_dir, names, "GenEval metadata"))
        prompts = [m["prompt"] for m in metas]
        if variant == "long":   # a rewrite: same lines, same order, longer "prompt" (BAGEL's evaluation)
            long = _jsonl(_first(suite_dir, [n.replace(".jsonl", "_long.jsonl") for n in names],
                                 "GenEval long rewrite (--variant long)"))
            if len(long) != len(metas) or any(a.get("tag") != b.get("tag") for a, b in zip(long, metas)):
                raise ValueError("the GenEval long rewrite does not match evaluation_metadata.jsonl line by line")
            prompts = [m["prompt"] for m in long]
        return [Item(f"{i:05d}", p, {"prompt": p, "semantic_questions": geneval_questions(m), "quality_questions": [],
                                      "task": m.get("tag")}, meta=m) for i, (p, m) in enumerate(zip(prompts, metas))]


class Prompts(_FolderPerPrompt):
    name = "prompts"
    official = "alphagrpo score --suite prompts --in OUT --suite-dir PROMPTS --judge ADDRESS"

    def default_dir(self):
        return None

    def read(self, suite_dir, variant):
        path = Path(suite_dir)
        if path.is_dir():
            raise ValueError(f"--suite prompts needs --suite-dir pointing at a file (JSONL records or one prompt per "
                             f"line), got the folder {path}")
        if path.suffix == ".jsonl":
            recs = _jsonl(path)
            bad = [i for i, r in enumerate(recs) if not isinstance(r, dict) or not str(r.get("prompt", "")).strip()]
            if bad:
                raise ValueError(f"{path}: line {bad[0] + 1} has no 'prompt'")
        else:
            recs = [{"prompt": ln.strip()} for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [Item(f"{i:05d}", r["prompt"], {"semantic_questions": [], "quality_questions": [], **r}, meta=r,
                     hint=r.get("hint")) for i, r in enumerate(recs)]


TIIF_DESCS = {"short": ("short_description",), "long": ("long_description",),
              "both": ("short_description", "long_description")}


class TIIF(Suite):
    name = "tiif"
    variants = tuple(TIIF_DESCS)
    max_images = 1
    model_name = "alphagrpo"
    official = ("python eval/eval_with_vlm.py --jsonl_dir data/testmini_eval_prompts --image_dir OUT --eval_model "
                "MODEL_NAME --output_dir RESULTS --api_key KEY --base_url URL --model gpt-4o && python "
                "eval/summary_results.py --input_dir RESULTS && python eval/summary_dimension_results.py "
                "--input_excel RESULTS/result_summary.xlsx --output_txt RESULTS/result_summary_dimension.txt")

    def __init__(self, split: str = "testmini", model_name: str = "alphagrpo"):
        if "/" in model_name or not model_name.strip():
            raise ValueError(f"the TIIF model name is a folder name; got {model_name!r}")
        self.split, self.model_name = split, model_name

    def default_dir(self):
        return None     # no license to ship TIIF-Bench's files: the user points --suite-dir at their copy

    def _folder(self, suite_dir: Path, kind: str) -> Path:
        for cand in (suite_dir / f"{self.split}_{kind}", suite_dir / "data" / f"{self.split}_{kind}"):
            if cand.is_dir():
                return cand
        if kind == "prompts" and list(suite_dir.glob("*_prompts.jsonl")):
            return suite_dir
        raise FileNotFoundError(f"TIIF-Bench: no {self.split}_{kind}/ folder under {suite_dir}")

    def read(self, suite_dir, variant):
        pdir = self._folder(suite_dir, "prompts")
        try:
            edir = self._folder(suite_dir, "eval_prompts")
        except FileNotFoundError:
            edir = None            # generation needs no questions; scoring and refinement do
        items = []
        for f in sorted(pdir.glob("*_prompts.jsonl")):
            if f.name.endswith("_eval_prompts.jsonl"):
                continue
            lines = _jsonl(f)
            evals = None
            if edir is not None:
                ef = edir / f.name.replace("_prompts.jsonl", "_eval_prompts.jsonl")
                evals = _jsonl(ef) if ef.exists() else None
                if evals is not None and len(evals) != len(lines):
                    raise ValueError(f"{ef} has {len(evals)} lines, {f} has {len(lines)}; they pair line by line")
            typ = lines[0]["type"] if lines else f.name[: -len("_prompts.jsonl")]   # the official scorer's rule
            for idx, line in enumerate(lines):
                qs = []
                if evals is not None:
                    ev = evals[idx]
                    qs = [_q(q.strip(), typ, a.strip().lower())
                          for q, a in zip(ev["yn_question_list"], ev["yn_answer_list"])]
                for desc in TIIF_DESCS[variant]:
                    p = line[desc]
                    items.append(Item(f"{typ}/{desc}/{idx}", p,
                                      {"prompt": p, "semantic_questions": qs, "quality_questions": [], "task": typ,
                                       "length": desc.split("_")[0], "line": idx}, meta=line, hint=line.get("hint")))
        if not items:
            raise FileNotFoundError(f"TIIF-Bench: no *_prompts.jsonl files in {pdir}")
        return items

    def target(self, out, item):
        typ, desc, idx = item.key.rsplit("/", 2)
        return out / typ / self.model_name / desc / f"{idx}.png"

    def write(self, out, item, images):
        _atomic_file(self.target(out, item), lambda tmp: _png(images[0], tmp))


def dpg_questions(csv_path: Path) -> dict:
    """``dpg_bench.csv`` -> ``{item_id: [question dicts with qid, parents, tag]}`` (DSG questions and dependencies)."""
    out: dict = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parents = [int(d) for d in str(row["dependency"]).split(",") if d.strip()]
            out.setdefault(str(row["item_id"]), []).append(
                _q(row["question_natural_language"].strip(), row["tuple"].split("(")[0].strip(),
                   qid=int(row["proposition_id"]), parents=parents))
    return out


class DPG(Suite):
    name = "dpg"
    max_images = 4
    official = "bash dpg_bench/dist_eval.sh OUT RESOLUTION   # in ELLA's repository; PIC_NUM=N for N < 4"

    def read(self, suite_dir, variant):
        f = suite_dir / "dpg_bench_prompts.jsonl"
        if f.exists():
            rows = [(str(r["item_id"]), r["prompt"].strip()) for r in _jsonl(f)]
        else:
            pdir = _first(suite_dir, ["prompts", "dpg_bench/prompts"], "DPG-Bench prompts (dpg_bench_prompts.jsonl "
                                                                       "or a prompts/ folder of <item_id>.txt)")
            rows = [(p.stem, p.read_text(encoding="utf-8").strip()) for p in sorted(pdir.glob("*.txt"))]
        qfile = next((p for p in (suite_dir / "dpg_bench.csv", suite_dir / "dpg_bench" / "dpg_bench.csv")
                      if p.exists()), None)
        qs = dpg_questions(qfile) if qfile else {}
        return [Item(i, p, {"prompt": p, "semantic_questions": qs.get(i, []), "quality_questions": []},
                     meta={"item_id": i, "prompt": p}) for i, p in rows]

    def target(self, out, item):
        return out / f"{item.key}.png"

    def write(self, out, item, images):
        _atomic_file(self.target(out, item), lambda tmp: _png(dpg_grid(images), tmp))

    def load(self, out, item, n):
        return dpg_tiles(super().load(out, item, n)[0], n)


def dpg_grid(images: Sequence[np.ndarray]) -> np.ndarray:
    """One image as is; 2..4 tiled 2x2 (row-major, black where none), the order ELLA's scorer crops them in."""
    if len(images) == 1:
        return np.asarray(images[0])
    h, w = images[0].shape[:2]
    grid = np.zeros((2 * h, 2 * w, 3), np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, 2)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return grid


def dpg_tiles(grid: np.ndarray, n: int) -> list[np.ndarray]:
    if n == 1:
        return [grid]
    h, w = grid.shape[0] // 2, grid.shape[1] // 2
    return [grid[(k // 2) * h:(k // 2 + 1) * h, (k % 2) * w:(k % 2 + 1) * w] for k in range(n)]


class WISE(Suite):
    name = "wise"
    variants = ("default", "rewrite")
    max_images = 1
    official = ("per category: python gpt_eval.py --json_path data/<category>.json --image_dir OUT --output_dir "
                "OUT/Results/<category> --api_key KEY --model gpt-4o-2024-05-13 --result_full "
                "OUT/Results/<category>_full_results.json --result_scores OUT/Results/<category>_scores_results.jsonl"
                "; then python Calculate.py OUT/Results/*_scores_results.jsonl --category all   (WISE_legacy/; "
                "WISE_Verified: IMAGE_DIR=OUT bash eval_qwen.sh)")

    def default_dir(self):
        return None

    def read(self, suite_dir, variant):
        files = sorted(p for p in Path(suite_dir).glob("*.json")
                       if p.name != "merge.json" and p.stem.endswith("_rewrite") == (variant == "rewrite"))
        if not files:
            raise FileNotFoundError(f"WISE: no {'*_rewrite.json' if variant == 'rewrite' else '*.json'} prompt files "
                                    f"in {suite_dir}")
        items = []
        for f in files:
            for r in json.loads(f.read_text(encoding="utf-8")):
                p = r["Prompt"]
                qs = [_q(f"Does the image depict this: {r['Explanation'].strip()}?", r.get("Category", "WISE"))] \
                    if r.get("Explanation") else []
                items.append(Item(str(r["prompt_id"]), p, {"prompt": p, "semantic_questions": qs,
                                                          "quality_questions": [], "task": r.get("Category")},
                                  meta=r, hint=r.get("hint") or r.get("Hint")))
        keys = [i.key for i in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"WISE: repeated prompt_id across {[f.name for f in files]}; point --suite-dir at one "
                             "release (WISE_legacy/data or data_verified)")
        return items

    def target(self, out, item):
        return out / f"{item.key}.png"

    def write(self, out, item, images):
        _atomic_file(self.target(out, item), lambda tmp: _png(images[0], tmp))


SUITES = {"geneval": GenEval, "tiif": TIIF, "dpg": DPG, "wise": WISE, "prompts": Prompts}


def get_suite(name: str, **kw) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return SUITES[name](**kw) if name == "tiif" else SUITES[name]()


def resolve_dir(suite: Suite, suite_dir: Optional[str]) -> Path:
    """``--suite-dir`` or the copy shipped in the package (GenEval, DPG-Bench: their licenses allow it)."""
    if suite_dir:
        p = Path(suite_dir)
        if not p.exists():
            raise FileNotFoundError(f"--suite-dir {p} does not exist")
        return p
    d = suite.default_dir()
    if d is None:
        raise ValueError(f"--suite {suite.name} needs --suite-dir: its prompt files are not shipped with alphagrpo "
                         "(point it at your copy of the benchmark)")
    return d


def shard(items: Sequence[Item], index: int, count: int) -> list[Item]:
    """Shard ``index`` of ``count``: every ``count``-th item (a deterministic split of the suite's order)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < n")
    return list(items[index::count])


def parse_shard(text: Optional[str], env=None) -> tuple[int, int]:
    """``"i/n"``; else ``RANK``/``WORLD_SIZE`` (torchrun) when set; else ``(0, 1)``."""
    env = os.environ if env is None else env
    if text:
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard expects i/n (e.g. 0/4), got {text!r}") from None
    elif "RANK" in env and "WORLD_SIZE" in env:
        i, n = int(env["RANK"]), int(env["WORLD_SIZE"])
    else:
        return 0, 1
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n")
    return i, n
