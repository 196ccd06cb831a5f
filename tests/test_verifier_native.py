"""native (shared prefix) against the hf oracle, on tiny random-weight Qwen2.5-VL and Qwen3-VL models (float32)."""
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from verifier_engine import Verifier  # noqa: E402
from verifier_engine.backends.hf import HFVerifier  # noqa: E402
from verifier_engine.backends.native import NativeVerifier  # noqa: E402
from verifier_engine.testing import build_tiny, random_images  # noqa: E402
from verifier_engine.vlm import VLBundle  # noqa: E402

QUESTIONS = ["Is there a red circle in the image?", "Are there exactly two blue squares?", "Yes", "no",
             "Is the dog sitting on the bench behind the tree, partially hidden by it?",
             "Is the style a watercolor painting?", "Is any text legible?"]



@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def bundle(request):
    model, tok, ip = build_tiny(request.param, seed=1)
    return VLBundle(model, tok, ip)


def _batch():
    # two image sizes -> two prefix lengths (two groups); question counts 1, 4, 7, 0, 3
    images = random_images(3, (64, 64), seed=3) + random_images(2, (96, 64), seed=4)
    counts = [1, 4, 7, 0, 3]
    qls = [[QUESTIONS[(i + j) % len(QUESTIONS)] for j in range(c)] for i, c in enumerate(counts)]
    return images, qls


def _flat(scores):
    return np.array([s for row in scores for s in row])


def test_native_agrees_with_hf_on_every_question(bundle):
    images, qls = _batch()
    ref = HFVerifier(bundle).score(images, qls)
    got = NativeVerifier(bundle).score(images, qls)
    assert [len(r) for r in got] == [len(q) for q in qls]
    diff = np.abs(_flat(ref) - _flat(got)).max()
    assert diff < 1e-3, diff
    assert diff < 1e-5  # in float32 the two paths differ by rounding only
    # the scores are informative: they differ across questions and across images
    assert np.ptp(_flat(ref)) > 0.05
    assert abs(ref[1][0] - ref[2][0]) > 1e-3 or abs(ref[1][1] - ref[2][1]) > 1e-3


def test_native_chunking_and_image_batching_do_not_change_scores(bundle):
    images, qls = _batch()
    ref = NativeVerifier(bundle).score(images, qls)
    tiny_chunks = NativeVerifier(bundle, max_images_per_batch=1, max_suffix_tokens=24).score(images, qls)
    assert np.abs(_flat(ref) - _flat(tiny_chunks)).max() < 1e-5


def test_native_is_sensitive_to_multimodal_rope_positions(bundle):
    """The agreement test can fail: suffix positions off by one change the scores well beyond 1e-3."""
    images, qls = _batch()
    ref = HFVerifier(bundle).score(images, qls)
    nat = NativeVerifier(bundle)
    prefix = nat._prefix
    nat._prefix = lambda *a: (lambda kv, pos: (kv, pos + 1))(*prefix(*a))
    assert np.abs(_flat(ref) - _flat(nat.score(images, qls))).max() > 1e-3


def test_hf_batched_without_prefix_sharing_matches_one_by_one(bundle):
    images, qls = _batch()
    one = HFVerifier(bundle).score(images, qls)
    batched = HFVerifier(bundle, batch_size=4).score(images, qls)  # left padding, mixed images per batch
    assert np.abs(_flat(one) - _flat(batched)).max() < 1e-5


def test_expected_answer_no_inverts_in_both_backends(bundle):
    images, qls = _batch()
    expected = [["no"] * len(q) if i % 2 else None for i, q in enumerate(qls)]
    for v in (HFVerifier(bundle), NativeVerifier(bundle)):
        plain, inv = v.score(images, qls), v.score(images, qls, expected)
        for i, (a, b) in enumerate(zip(plain, inv)):
            want = [1 - x for x in a] if i % 2 else a
            assert np.allclose(b, want, atol=1e-9)
        assert isinstance(v, Verifier)


def test_prefix_and_suffix_pieces_tokenise_like_the_whole_query(bundle):
    for q in QUESTIONS + ["  spaced   question ?", "Ünïcödé question: is it 3 > 2?"]:
        for n in (1, 16):
            assert bundle.prefix_ids(n) + bundle.suffix_ids([q])[0] == bundle.full_ids(q, n)


def test_empty_question_lists_and_empty_batches(bundle):
    nat = NativeVerifier(bundle)
    assert nat.score([], []) == []
    assert nat.score(random_images(2, (64, 64)), [[], []]) == [[], []]
    with pytest.raises(ValueError, match="uint8"):
        nat.score([np.zeros((8, 8), dtype=np.uint8)], [["q?"]])


class _StandInGraph:
    """Replays by recomputing into the captured output: exercises the bucketing, padding and copies on CPU."""

    def __init__(self, fn, static, out, broken=False):
        self.fn, self.static, self.out, self.broken = fn, static, out, broken

    def replay(self):
        self.out.copy_(self.fn(*self.static) if not self.broken else torch.zeros_like(self.out))


def test_cuda_graph_runner_pads_buckets_and_falls_back_when_a_replay_is_wrong(bundle, monkeypatch):
    from verifier_engine.backends.cuda_graphs import SuffixGraphs
    images, qls = _batch()
    nat = NativeVerifier(bundle)
    eager = nat.score(images, qls)
    for broken in (False, True):
        def record(self, *static, broken=broken):
            out = self.fn(*static)
            return _StandInGraph(self.fn, static, out, broken), out
        monkeypatch.setattr(SuffixGraphs, "_record", record)
        nat.graphs = SuffixGraphs(nat._suffix_forward, nat.n_yes, max_tokens=10 ** 6)
        for _ in range(2):
            assert np.abs(_flat(nat.score(images, qls)) - _flat(eager)).max() < 1e-5
        g = nat.graphs
        if broken:
            assert g.disabled and not g.graphs  # the mismatch was caught; eager scores were returned
        else:
            assert not g.disabled and g.graphs and g.replays >= 2 * len(g.graphs)
            assert all(k[0] & (k[0] - 1) == 0 for k in g.graphs)  # rows bucketed to powers of two


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager_on_gpu():
    model, tok, ip = build_tiny("qwen3_vl", seed=1, device="cuda")
    b = VLBundle(model, tok, ip)
    images, qls = _batch()
    eager = NativeVerifier(b, cuda_graphs=False).score(images, qls)
    graphed = NativeVerifier(b, cuda_graphs=True)
    for _ in range(2):  # capture, then replay
        got = graphed.score(images, qls)
        assert np.abs(_flat(eager) - _flat(got)).max() < 1e-4
    assert graphed.graphs.replays > 0 and not graphed.graphs.disabled
    ref = HFVerifier(b).score(images, qls)
    assert np.abs(_flat(ref) - _flat(eager)).max() < 1e-3
