"""DVReward over a Verifier: question routing, modes (geometric / semantic-only / holistic), errors."""
import math

import pytest

from alphagrpo.rewards import DVReward

REC = {"prompt": "a red circle",
       "semantic_questions": [{"question": "is there a red circle?", "tag": "Existence"},
                              {"question": "is the circle red?", "tag": "Attribute"}],
       "quality_questions": [{"question": "are the edges clean?", "tag": "Geometry"}]}


class Table:
    """A verifier answering from a fixed table, recording what it was asked."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def score(self, images, question_lists):
        self.asked.append([list(q) for q in question_lists])
        return [[self.answers[q] for q in qs] for qs in question_lists]


def test_dvreward_geometric_mean_of_semantic_and_quality_means():
    v = Table({"is there a red circle?": 1.0, "is the circle red?": 0.5, "are the edges clean?": 0.64})
    res = DVReward(v)([object()], [REC])
    assert res.rewards.item() == pytest.approx(math.sqrt(0.75 * 0.64))
    assert res.semantic == [[1.0, 0.5]] and res.quality == [[0.64]]
    assert v.asked == [[["is there a red circle?", "is the circle red?", "are the edges clean?"]]]


def test_semantic_only_and_holistic_modes_ask_different_questions():
    v = Table({"is there a red circle?": 1.0, "is the circle red?": 0.5,
               "Does this image match: a red circle?": 0.9})
    assert DVReward(v, mode="semantic")([0], [REC]).rewards.item() == pytest.approx(0.75)
    assert v.asked[-1] == [["is there a red circle?", "is the circle red?"]]
    assert DVReward(v, holistic=True)([0], [REC]).rewards.item() == pytest.approx(0.9)
    assert v.asked[-1] == [["Does this image match: a red circle?"]]


def test_dvreward_rejects_mismatched_batches_and_non_verifiers():
    with pytest.raises(ValueError, match="2 images but 1 prompt records"):
        DVReward(Table({}))([0, 1], [REC])
    with pytest.raises(TypeError, match="Verifier protocol"):
        DVReward(object())
