"""``alphagrpo generate`` / ``score``: each benchmark's official layout (checked the way its scorer reads it),
resume without regeneration, sharding, refinement in the manifest, exact TIIF-Bench aggregation, and an end-to-end
run with the tiny random Qwen verifier served on loopback."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from alphagrpo.eval import bench, judge, suites

# ---------------------------------------------------------------- fixtures: a micro TinyUMM, benchmark-shaped files
TIIF_PROMPTS = {   # type -> [(short, long)]
    "2d_spatial_relation": [("A cat left of a dog.", "A calm cat sits to the left of a sleepy dog."),
                            ("A bird above a cow.", "High above a grazing cow, a small bird flies.")],
    "style": [("A cat, oil painting.", "An oil painting of a cat by a window.")],
    "negation": [("A room without a dog.", "An empty room, with no dog anywhere.")],
}
TIIF_EVAL = {
    "2d_spatial_relation": [(["Is there a cat?  ", "Is there a dog?", "Is the cat on the left of the dog?"],
                             ["yes", "yes", "yes"]),
                            (["Is there a cat in the image?", "Is there a bird?"], ["No", "no"])],
    "style": [(["Is the cat an oil painting?"], ["Yes"])],
    "negation": [(["Is there a dog?"], ["no"])],
}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from alphagrpo.testing import micro_policy
    path = tmp_path_factory.mktemp("micro") / "policy"
    micro_policy(0).save_pretrained(path)
    return path


def load(micro):
    from alphagrpo.models.registry import ModelConfig, load_policy
    return load_policy(ModelConfig(path=str(micro), options=("unknown_words=unk",)), "cpu")


@pytest.fixture()
def tiif_dir(tmp_path):
    root = tmp_path / "TIIF-Bench" / "data"
    for sub in ("testmini_prompts", "testmini_eval_prompts"):
        (root / sub).mkdir(parents=True)
    for typ, lines in TIIF_PROMPTS.items():
        (root / "testmini_prompts" / f"{typ}_prompts.jsonl").write_text("".join(
            json.dumps({"type": typ, "short_description": s, "long_description": lo}) + "\n" for s, lo in lines))
        (root / "testmini_eval_prompts" / f"{typ}_eval_prompts.jsonl").write_text("".join(
            json.dumps({"type": typ, "yn_question_list": q, "yn_answer_list": a}) + "\n" for q, a in TIIF_EVAL[typ]))
    return root.parent


def cli(*argv):
    from alphagrpo.cli import main
    return main(list(argv))


def gen(out, suite, *extra, micro):
    return cli("generate", "--suite", suite, "--out", str(out), "--steps", "2", "--max-think-tokens", "3",
               "--set", f"model.path={micro}", "--set", "model.options=unknown_words=unk", *extra)


def settings(**kw):
    from alphagrpo.eval.evaluate import EvalSettings
    return bench.GenSettings(EvalSettings(num_steps=kw.pop("steps", 2), max_think_tokens=3, batch=8), **kw)


# ---------------------------------------------------------------- layouts, as each official scorer reads them
def test_geneval_layout_is_what_evaluate_images_reads(tmp_path, micro):
    out = tmp_path / "geneval"
    assert gen(out, "geneval", "--limit", "3", "--n", "2", "--resolution", "24", micro=micro) == 0
    metas = [json.loads(ln) for ln in (suites.ASSETS / "geneval" / "evaluation_metadata.jsonl").open()][:3]
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.isdigit())
    assert folders == ["00000", "00001", "00002"]
    for i, name in enumerate(folders):
        with open(out / name / "metadata.jsonl") as fp:
            assert json.load(fp) == metas[i]                  # evaluate_images.py: json.load of the whole file
        samples = sorted((out / name / "samples").iterdir())
        assert [p.name for p in samples] == ["0000.png", "0001.png"]
        assert all(re.match(r"\d+\.png", p.name) for p in samples)
        assert Image.open(samples[0]).size == (24, 24)
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["n"] == 2 and m["settings"]["sampling"]["num_steps"] == 2
    assert m["settings"]["suite"] == "geneval" and m["settings"]["model"]["options"] == ["unknown_words=unk"]
    assert set(m["items"]) == set(folders) and m["items"]["00001"]["seed"] == bench.item_seed(0, "00001")
    before = (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns
    assert gen(out, "geneval", "--limit", "4", "--n", "2", "--resolution", "24", micro=micro) == 0   # a larger look
    assert (out / "00003").is_dir() and (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns == before


def test_tiif_layout_is_what_eval_with_vlm_reads(tmp_path, tiif_dir, micro):
    out = tmp_path / "tiif"
    assert gen(out, "tiif", "--suite-dir", str(tiif_dir / "data"), "--model-name", "mymodel", "--no-think",
               micro=micro) == 0
    # eval_with_vlm.py: per eval file, type = its first line's "type"; image <image_dir>/<type>/<model>/<desc>/<i>.*
    for f in (tiif_dir / "data" / "testmini_eval_prompts").glob("*.jsonl"):
        lines = f.read_text().splitlines()
        typ = json.loads(lines[0])["type"]
        for desc in ("long_description", "short_description"):
            names = sorted(p.name for p in (out / typ / "mymodel" / desc).iterdir())
            assert names == [f"{i}.png" for i in range(len(lines))]
    assert "think" not in json.loads((out / "manifest.json").read_text())["items"]["style/long_description/0"]


def test_dpg_grid_is_the_samples_tiled_as_the_scorer_crops_them(tmp_path, micro):
    out = tmp_path / "dpg"
    assert gen(out, "dpg", "--limit", "2", micro=micro) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "1.png"]
    grid = np.asarray(Image.open(out / "1.png").convert("RGB"))
    r = grid.shape[0] // 2
    assert grid.shape == (2 * r, 2 * r, 3) and r == 16
    crops = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]   # ELLA's crop order (x0, y0..)
    suite = suites.get_suite("dpg")
    item = suite.read(suites.ASSETS / "dpg", "default")[1]
    drawn, _ = bench.draw_item(load(micro), item, settings(n=4))
    for (x0, y0, x1, y1), img in zip(crops, drawn):       # same seed, same images: the per-prompt seed rule
        assert np.array_equal(grid[y0:y1, x0:x1], img)
    assert not np.array_equal(drawn[0], drawn[1])


def test_wise_images_are_named_by_prompt_id(tmp_path, micro):
    d = tmp_path / "wise"
    d.mkdir()
    rows = [{"Prompt": "Traditional food of the Mid-Autumn Festival", "Explanation": "mooncakes",
             "Category": "Cultural knowledge", "Subcategory": "Festival", "prompt_id": 7},
            {"Prompt": "Ice at 20 degrees Celsius", "Explanation": "melting ice", "Category": "Physics",
             "Subcategory": "State", "prompt_id": 641, "hint": "think about melting"}]
    (d / "cultural_common_sense.json").write_text(json.dumps(rows))
    (d / "cultural_common_sense_rewrite.json").write_text(json.dumps([dict(rows[0], Prompt="Mooncakes.")]))
    out = tmp_path / "out"
    assert gen(out, "wise", "--suite-dir", str(d), micro=micro) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["641.png", "7.png"]
    items = json.loads((out / "manifest.json").read_text())["items"]
    assert items["641"]["prompt"] == "Ice at 20 degrees Celsius\nthink about melting"   # the hint, thinking on
    assert items["7"]["prompt"] == rows[0]["Prompt"]
    assert [i.prompt for i in suites.get_suite("wise").read(d, "rewrite")] == ["Mooncakes."]


def test_tiif_needs_a_suite_dir_and_geneval_long_needs_its_rewrite(tmp_path, micro, capsys):
    assert gen(tmp_path / "o", "tiif", micro=micro) == 2
    assert "needs --suite-dir" in capsys.readouterr().err
    assert gen(tmp_path / "o", "geneval", "--variant", "long", micro=micro) == 2
    assert "long rewrite" in capsys.readouterr().err


# ---------------------------------------------------------------- resume, shards, settings, refinement
class Counting:
    """Forwards to a policy; counts image draws (one per prompt) and can stop the run after ``stop_after``."""

    def __init__(self, inner, stop_after=None):
        self.inner, self.draws, self.stop_after = inner, 0, stop_after

    def image_condition(self, *a, **k):
        if self.stop_after is not None and self.draws >= self.stop_after:
            raise KeyboardInterrupt("stopped")
        self.draws += 1
        return self.inner.image_condition(*a, **k)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_stopped_run_resumes_without_drawing_anything_twice(tmp_path, micro):
    suite = suites.get_suite("geneval")
    items = suite.read(suites.ASSETS / "geneval", "short")[:4]
    s = settings(n=2)
    out = tmp_path / "g"
    first = Counting(load(micro), stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        bench.run_suite(first, suite, items, out, s)
    assert sorted(p.name for p in out.iterdir() if p.name.isdigit()) == ["00000", "00001"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("0000[01]/samples/*.png")}
    second = Counting(load(micro))
    res = bench.run_suite(second, suite, items, out, s)
    assert res == {"generated": 2, "skipped": 2, "total": 4} and second.draws == 2
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    third = Counting(load(micro))
    assert bench.run_suite(third, suite, items, out, s)["generated"] == 0 and third.draws == 0
    with pytest.raises(ValueError, match="sampling differ"):
        bench.run_suite(third, suite, items, out, settings(n=2, steps=3))


def test_shards_split_the_suite_and_fill_one_folder(tmp_path, micro):
    items = suites.get_suite("geneval").read(suites.ASSETS / "geneval", "short")[:5]
    a, b = suites.shard(items, 0, 2), suites.shard(items, 1, 2)
    assert sorted(i.key for i in a + b) == [i.key for i in items] and not {i.key for i in a} & {i.key for i in b}
    assert suites.parse_shard(None, {"RANK": "1", "WORLD_SIZE": "3"}) == (1, 3)
    assert suites.parse_shard("2/4", {"RANK": "1", "WORLD_SIZE": "3"}) == (2, 4)
    with pytest.raises(ValueError):
        suites.parse_shard("4/4", {})
    out = tmp_path / "s"
    for k in ("0/2", "1/2"):
        assert gen(out, "geneval", "--limit", "5", "--n", "1", "--shard", k, micro=micro) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.isdigit()) == [f"{i:05d}" for i in range(5)]
    assert sorted(json.loads((out / "manifest.json").read_text())["items"]) == [f"{i:05d}" for i in range(5)]


class StubVerifier:
    """Known answers: P(yes) = 0.9 when the question mentions a cat, else 0.1; every answer "no" on dark images."""

    def __init__(self):
        self.calls = 0

    def score(self, images, question_lists):
        self.calls += 1
        return [[(0.9 if "cat" in q.lower() else 0.1) if np.asarray(im).mean() > 127 else 0.1 for q in qs]
                for im, qs in zip(images, question_lists)]


def test_refinement_rounds_are_recorded_in_the_manifest(tmp_path, micro):
    recs = tmp_path / "p.jsonl"
    recs.write_text(json.dumps({"prompt": "a dog", "semantic_questions": [{"question": "Is there a dog?",
                                                                           "tag": "Existence"}]}) + "\n"
                    + json.dumps({"prompt": "a cat", "semantic_questions": [{"question": "Is there a cat?",
                                                                           "tag": "Existence"},
                                                                          {"question": "Is there a dog?",
                                                                           "tag": "Negative", "answer": "no"}]}) + "\n")
    suite = suites.get_suite("prompts")
    items = suite.read(recs, "default")
    reward = judge.QuestionReward(WhiteStub())
    for only_failed, want in ((False, [2, 2]), (True, [2, 0])):
        out = tmp_path / f"r{only_failed}"
        s = settings(n=2, refine_rounds=2, refine_only_failed=only_failed)
        bench.run_suite(load(micro), suite, items, out, s, reward=reward)
        m = json.loads((out / "manifest.json").read_text())
        assert m["settings"]["refine_rounds"] == 2
        assert m["items"]["00000"]["refine"]["rounds_used"] == [want[0]] * 2     # "a dog" always fails
        assert m["items"]["00001"]["refine"]["rounds_used"] == [want[1]] * 2     # "a cat" never does
        assert m["items"]["00001"]["refine"]["final_reward"] == pytest.approx([0.9, 0.9])
        assert len(m["items"]["00000"]["refine"]["think"][0]) == 3               # initial + 2 rounds
    with pytest.raises(ValueError, match="needs a judge"):
        bench.run_suite(load(micro), suite, items, tmp_path / "x", settings(refine_rounds=1))


class WhiteStub(StubVerifier):
    def score(self, images, question_lists):     # brightness-independent: the micro model's images are arbitrary
        return super().score([np.full((4, 4, 3), 255, np.uint8)] * len(images), question_lists)


# ---------------------------------------------------------------- scoring
def write_tiif(tmp_path, tiif_dir):
    """Short images white, long images black: the stub's answers, hence the accuracies, are known exactly."""
    suite = suites.get_suite("tiif", model_name="m")
    out = tmp_path / "tiif_out"
    items = suite.read(tiif_dir / "data", "both")
    for it in items:
        v = 255 if it.record["length"] == "short" else 0
        suite.write(out, it, [np.full((16, 16, 3), v, np.uint8)])
    return suite, out, items


def test_tiif_score_gives_the_exact_per_dimension_accuracies(tmp_path, tiif_dir):
    suite, out, items = write_tiif(tmp_path, tiif_dir)
    r = judge.score_suite(suite, out, items, StubVerifier(), judge="stub", batch=3)   # 3 calls
    # short: 2d relation (yes,no,yes vs yes,yes,yes) + (yes,no vs no,no) = 3/5; style 1/1; negation (no vs no) 1/1
    # long: every answer "no": 2d relation 0/3 + 2/2 = 2/5; style 0/1; negation 1/1
    assert r["per_type"]["2d_spatial_relation"] == pytest.approx({"short": 60.0, "long": 40.0})
    assert r["per_type"]["style"] == pytest.approx({"short": 100.0, "long": 0.0})
    d = r["dimensions"]
    assert d["Basic Following: Relation"] == pytest.approx({"short": 60.0, "long": 40.0})
    assert d["Basic Following: Reasoning"] == pytest.approx({"short": 100.0, "long": 100.0})
    assert d["Basic Following: Avg"] == pytest.approx({"short": 80.0, "long": 70.0})
    assert d["Advanced Following: Style"] == pytest.approx({"short": 100.0, "long": 0.0})
    assert d["Basic Following: Attribute"] == {"short": None, "long": None}
    assert r["overall"] == pytest.approx({"short": 260 / 3, "long": 140 / 3})   # mean of the dimensions present
    assert r["judge"] == "stub" and "not comparable" in r["note"]


def test_score_command_over_http_names_the_judge_and_writes_the_report(tmp_path, tiif_dir, capsys):
    pytest.importorskip("fastapi")
    from verifier_engine.server import ServerConfig, create_app
    from verifier_engine.testing import serve_in_thread
    suite, out, items = write_tiif(tmp_path, tiif_dir)
    with serve_in_thread(create_app(StubVerifier(), ServerConfig(max_wait_ms=0))) as url:
        rc = cli("score", "--suite", "tiif", "--in", str(out), "--judge", url, "--suite-dir", str(tiif_dir / "data"),
                 "--model-name", "m")
    assert rc == 0
    printed = capsys.readouterr().out
    last = json.loads(printed.strip().splitlines()[-1])
    assert last["judge"] == url and last["overall"] == pytest.approx({"short": 260 / 3, "long": 140 / 3})
    report = json.loads((out / "scores-tiif.json").read_text())
    assert report["judge"] == url and report["scored_prompts"] == 8
    assert f"scored by {url}" in printed and "Basic Following: Relation" in printed


def test_prompts_score_and_geneval_proxy(tmp_path):
    recs = tmp_path / "p.jsonl"
    recs.write_text(json.dumps({"prompt": "a cat", "semantic_questions": [
        {"question": "Is there a cat?", "tag": "Existence"}, {"question": "Is the cat blue?", "tag": "Attribute"},
        {"question": "Is there a dog?", "tag": "Negative", "answer": "no"}],
        "quality_questions": [{"question": "Is it sharp?", "tag": "Texture"}]}) + "\n")
    suite = suites.get_suite("prompts")
    items = suite.read(recs, "default")
    suite.write(tmp_path / "o", items[0], [np.full((8, 8, 3), 255, np.uint8)] * 2)
    r = judge.score_suite(suite, tmp_path / "o", items, StubVerifier(), judge="stub", n=2)
    assert r["per_tag"] == {"Attribute": 100.0, "Existence": 100.0, "Negative": 100.0, "Texture": 0.0}
    assert r["question_accuracy"] == 75.0 and r["image_accuracy"] == 0.0
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 2, "color": "red", "position": ["right of", 0]}],
            "exclude": [{"class": "dog", "count": 3}]}
    assert [q["question"] for q in suites.geneval_questions(meta)] == [
        "Is there a teddy bear in the image?", "Are there exactly 2 dogs in the image?", "Is the dog red?",
        "Is the dog right of the teddy bear?", "Are there fewer than 3 dogs in the image?"]


def test_dpg_proxy_applies_dsg_dependencies(tmp_path):
    csv = tmp_path / "dpg_bench.csv"
    csv.write_text("item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,"
                   "question_natural_language\n"
                   '0,t,k,1,0,entity,whole,entity - whole (cat),Is there a cat?\n'
                   '0,t,k,2,1,attribute,color,"attribute - color (cat, black)",Is the cat black?\n'
                   '0,t,k,3,0,entity,whole,entity - whole (dog),Is there a dog?\n'
                   '0,t,k,4,3,attribute,color,"attribute - color (dog, cat-colored)",Is the dog the cat\'s color?\n')
    (tmp_path / "dpg_bench_prompts.jsonl").write_text(json.dumps({"item_id": "0", "prompt": "a black cat"}) + "\n")
    suite = suites.get_suite("dpg")
    items = suite.read(tmp_path, "default")
    suite.write(tmp_path / "o", items[0], [np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)])
    r = judge.score_suite(suite, tmp_path / "o", items, StubVerifier(), judge="stub", n=2)
    # white tile: cat yes, black yes, dog no, "dog the cat's color" yes but its parent failed -> 0: 2/4
    # black tile: all no -> 0/4;  item = mean(0.5, 0) = 25
    assert r["overall"] == pytest.approx(25.0) and "PROXY" in r["note"]
    assert r["per_category"] == pytest.approx({"attribute": 25.0, "entity": 25.0})


def test_tiif_end_to_end_with_the_tiny_qwen_verifier_on_loopback(tmp_path, tiif_dir, micro):
    pytest.importorskip("transformers")
    pytest.importorskip("fastapi")
    from verifier_engine.backends.native import NativeVerifier
    from verifier_engine.server import ServerConfig, create_app
    from verifier_engine.testing import build_tiny, serve_in_thread
    from verifier_engine.vlm import VLBundle
    out = tmp_path / "tiif"
    assert gen(out, "tiif", "--suite-dir", str(tiif_dir / "data"), "--variant", "short", micro=micro) == 0
    model, tok, ip = build_tiny("qwen2_5_vl", seed=3)
    with serve_in_thread(create_app(NativeVerifier(VLBundle(model, tok, ip)), ServerConfig(max_wait_ms=5),
                                    backend="native", model="tiny")) as url:
        assert cli("score", "--suite", "tiif", "--in", str(out), "--judge", url) == 0
    r = json.loads((out / "scores-tiif.json").read_text())
    assert r["scored_prompts"] == 4 and r["missing_prompts"] == 0 and r["judge"] == url
    assert 0.0 <= r["overall"]["short"] <= 100.0 and r["overall"]["long"] is None
    assert set(r["per_type"]) == set(TIIF_PROMPTS)


# ---------------------------------------------------------------- TinyUMM's opt-in unknown-word mode
def test_unknown_words_are_refused_by_default_and_mapped_when_asked(micro):
    from alphagrpo.models.registry import ModelConfig, load_policy
    from alphagrpo.models.tokenizer import WordTokenizer
    tok = WordTokenizer(["a", "cat"])
    with pytest.raises(ValueError, match="'zebra' is not in"):
        tok.encode("a zebra")
    assert WordTokenizer(["a", "cat"], unknown="unk").encode("a zebra cat") == [tok.stoi["a"], tok.pad_id,
                                                                               tok.stoi["cat"]]
    assert WordTokenizer(["a", "cat", "<unk>"], unknown="unk").encode("zebra") == [9]
    assert WordTokenizer(["a", "cat"], unknown="cat").encode("zebra") == [tok.stoi["cat"]]
    plain = load_policy(ModelConfig(path=str(micro)), "cpu")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        plain.tok.encode("a zebra")
    assert len(load(micro).tok) == len(plain.tok)          # the vocabulary (and the model) are unchanged
    with pytest.raises(ValueError, match="not TinyUMM options"):
        load_policy(ModelConfig(path=str(micro), options=("unknown=unk",)), "cpu")


# ---------------------------------------------------------------- the real prompt files
_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SHARED_TIIF = next((p / "shared" / "data" / "tiif-bench-testmini" for p in (_ROOT.parent, _ROOT.parent.parent)
                    if (p / "shared" / "data" / "tiif-bench-testmini").is_dir()),
                   _ROOT.parent / "shared" / "data" / "tiif-bench-testmini")   # a checkout beside the shared data


def test_shipped_and_real_prompt_files_read_completely():
    gen_items = suites.get_suite("geneval").read(suites.ASSETS / "geneval", "short")
    assert len(gen_items) == 553 and gen_items[552].key == "00552"
    assert len(suites.get_suite("dpg").read(suites.ASSETS / "dpg", "default")) == 1065
    if not SHARED_TIIF.is_dir():
        pytest.skip(f"TIIF-Bench testmini is not at {SHARED_TIIF} (not shipped: no license)")
    items = suites.get_suite("tiif").read(SHARED_TIIF, "short")
    qs = [q for it in items for q in it.record["semantic_questions"]]
    assert len(items) == 277 and len({it.record["task"] for it in items}) == 39
    assert (len(qs), sum(judge.expected(q) == "no" for q in qs)) == (1446, 34)   # as its SOURCE.txt counts them
