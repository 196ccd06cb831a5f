"""The shapes world (``data.world=shapes``, the embedded default): synthesized prompts, the programmatic
verifier (the reward's, with ``reward.verifier=world``) and the strict ground-truth judge. A JSONL ``train_file``
of shapes prompts replaces the synthesized training prompts; every question in it must be one the shapes verifier
can answer (other prompts belong in the ``jsonl`` world with a real verifier).

Refinement pretraining examples (``sample_edit``): a satisfying scene is sampled, one edit (recolor, reshape,
resize, move, remove, add) makes it violate at least one semantic question, the wrong render is blurred/noised a
little (a generated image is never clean), and the think text is ``wrong : <a failed question> ; plan : <plan>``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from alphagrpo.worlds.base import World

EDIT_WORDS = ("wrong", ":", "plan")


def _perturb(S, scene, rng: np.random.Generator):
    """One random edit of a shapes scene, or None if that edit does not apply."""
    objs = list(scene.objects)
    free = [(x, y) for x in range(S.GRID) for y in range(S.GRID) if all((o.x, o.y) != (x, y) for o in objs)]
    kind = rng.choice(["color", "shape", "size", "move", "remove", "add"])
    if kind in ("color", "shape", "size", "move", "remove") and not objs:
        return None
    i = int(rng.integers(len(objs))) if objs else 0
    if kind == "color":
        objs[i] = dataclasses.replace(objs[i], color=str(rng.choice([c for c in S.COLORS if c != objs[i].color])))
    elif kind == "shape":
        objs[i] = dataclasses.replace(objs[i], shape=str(rng.choice([s for s in S.SHAPES if s != objs[i].shape])))
    elif kind == "size":
        objs[i] = dataclasses.replace(objs[i], size=[s for s in S.SIZES if s != objs[i].size][0])
    elif kind == "move":
        if not free:
            return None
        x, y = free[int(rng.integers(len(free)))]
        objs[i] = dataclasses.replace(objs[i], x=x, y=y)
    elif kind == "remove":
        objs.pop(i)
    else:
        if not free:
            return None
        x, y = free[int(rng.integers(len(free)))]
        objs.append(S.ShapeObject(str(rng.choice(S.SHAPES)), str(rng.choice(list(S.COLORS))),
                                  str(rng.choice(S.SIZES)), x, y))
    return S.Scene(tuple(objs))


def shapes_edit_example(record, rng: np.random.Generator):
    """A refinement pretraining example for a shapes record: ``(wrong image, think text, right image)``. The wrong
    scene is one edit away from a satisfying scene and violates at least one semantic question when an edit can;
    its render is blurred and noised a little; the think text is ``wrong : <failed question> ; plan : <plan>``."""
    from alphagrpo.worlds import shapes as S
    right = S.sample_scene(record, rng)
    checks = S.semantic_checks(record)
    wrong, failed = None, []
    for _ in range(12):
        cand = _perturb(S, right, rng)
        if cand is None:
            continue
        failed = [q for q, c in zip(record["semantic_questions"], checks) if not S.evaluate(cand.objects, c)]
        wrong = cand
        if failed:
            break
    if wrong is None:
        wrong = right
    think = (f"wrong : {failed[0]['question']} ; " if failed else "") + f"plan : {S.plan_text(right)}"
    img = S.degrade(S.render(wrong), rng, noise_std=float(rng.uniform(0, 12)), blur_sigma=float(rng.uniform(0, 0.9)))
    return img, think, S.render(right)


def shapes_plan_ok(think: str, record) -> bool:
    """Whether the layout a think text states (its ``plan : ...`` part when it has one) makes every semantic question
    of ``record`` true, judged on the stated scene itself, before any drawing. An unreadable plan is not ok."""
    from alphagrpo.worlds import shapes as S
    text = think.split("plan :", 1)[1] if "plan :" in think else think
    try:
        scene = S.parse_plan(text)
    except ValueError:
        return False
    return S.satisfies(scene, record)


class HolisticShapesVerifier:
    """Answers the holistic question ``"Does this image match: {prompt}?"`` (the paper's single-score ablation) the
    way a coarse overall judge would: the fraction of the prompt's semantic questions the image satisfies, rounded
    to a 0-10 scale (as VIEScore's), divided by 10. Any other question goes to the wrapped verifier."""

    PREFIX = "Does this image match: "

    def __init__(self, inner, records):
        self.inner = inner
        self.by_prompt = {r["prompt"]: r for r in records}

    def score(self, images, question_lists):
        out = []
        for img, qs in zip(images, question_lists):
            row = []
            for q in qs:
                if q.startswith(self.PREFIX) and q.endswith("?"):
                    rec = self.by_prompt.get(q[len(self.PREFIX):-1])
                    if rec is None:
                        raise ValueError(f"holistic question about an unknown prompt: {q!r}")
                    ans = self.inner.answers(img, [x["question"] for x in rec["semantic_questions"]])
                    row.append(round(10 * sum(bool(y) for _, y in ans) / max(1, len(ans))) / 10)
                else:
                    row.extend(self.inner.score([img], [[q]])[0])
            out.append(row)
        return out


def load_shapes_world(cfg) -> World:
    """The shapes world. Test: the first ``test_size`` prompts of a fixed shuffle of a 1,024-prompt test split (the
    split is ordered by task, so a plain prefix would cover only a few task types); always the same prompts, disjoint
    from everything else. Training (``train_per_task`` prompts per task type), by ``train_split``: ``"unseen"``
    (default, for RL) draws prompts after the 500-per-task pretraining split, so RL trains on prompts the shipped
    checkpoint never saw, as it will be judged on; ``"pretrain"`` takes the first ones of the pretraining split
    (what ``alphagrpo pretrain`` trains on). ``train_file`` (JSONL) replaces the synthesized training prompts.
    ``quality_per_object="mean"`` scores per-object quality questions by the average object in the reward (the strict
    judge is unchanged)."""
    from alphagrpo.worlds import shapes as S
    unseen = cfg.train_split == "unseen"
    full_train, full_test, extra = S.synthesize_splits(n_per_task=500, n_test=max(1024, cfg.test_size),
                                                       n_extra_per_task=cfg.train_per_task if unseen else 0,
                                                       seed=cfg.seed)
    per_task: dict = {}
    train = []
    for r in (extra if unseen else full_train):
        k = per_task.get(r["task"], 0)
        if k < cfg.train_per_task:
            train.append(r)
            per_task[r["task"]] = k + 1
    order = np.random.default_rng(cfg.seed + 1_000_003).permutation(len(full_test))
    full_test = [full_test[i] for i in order]
    if cfg.train_file:
        train = _shapes_records(cfg.train_file)
    verifier = S.ShapesVerifier()   # the strict judge; its soft answers are the reward's unless quality_per_object
    scorer = verifier if cfg.quality_per_object == "every" else S.ShapesVerifier(cfg.quality_per_object)
    reward_verifier = HolisticShapesVerifier(scorer, full_train + full_test + extra + train)

    def judge(image, record) -> bool:
        return bool(verifier.judge(image, [q["question"] for q in record["semantic_questions"]]))

    def sample_target(record, rng):
        scene = S.sample_scene(record, rng)
        return S.plan_text(scene), S.render(scene)

    def failed(image, record):
        return S.failed_questions(image, record, verifier)

    return World(train=train, test=full_test[: cfg.test_size], verifier=reward_verifier, judge=judge,
                 words=sorted(set(S.vocabulary()) | set(EDIT_WORDS)), sample_target=sample_target,
                 failed=failed, sample_edit=shapes_edit_example, plan_ok=shapes_plan_ok, name="shapes")


def _shapes_records(path) -> list:
    """``data.train_file`` for the shapes world: records whose every question the shapes verifier can parse."""
    from alphagrpo.worlds import shapes as S
    from alphagrpo.worlds.jsonl import read_records
    records = read_records(path)
    for i, r in enumerate(records):
        for key in ("semantic_questions", "quality_questions"):
            for q in r.get(key) or []:
                try:
                    S.parse_question(q["question"])
                except S.QuestionParseError:
                    raise ValueError(f"data.train_file={path}: record {i + 1} asks {q['question']!r}, which the "
                                     "shapes world's verifier cannot answer; for prompts of your own use "
                                     "data.world=jsonl with reward.verifier=ADDRESS (a VLM verifier)") from None
    return records
