"""Samplers and logits processors, no model."""

import math

import numpy as np
import pytest

from onnxlm.runtime.sampling import log_softmax, make_logits_processors, make_sampler

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS)[None, :]  # (1, vocab)


def support(sampler, logits, n=400):
    return set(sampler(np.repeat(logits, n, axis=0)).tolist())


def test_greedy_is_argmax_per_row():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50))
    assert make_sampler()(logits).tolist() == logits.argmax(-1).tolist()
    assert make_sampler(temperature=0, top_k=3, seed=1)(logits).tolist() == logits.argmax(-1).tolist()


def test_full_distribution_sampling_matches_probabilities():
    ids = make_sampler(temperature=1.0, seed=0)(np.repeat(LOGITS, 20000, axis=0))
    freq = np.bincount(ids, minlength=4) / len(ids)
    np.testing.assert_allclose(freq, PROBS, atol=0.02)


def test_top_k_top_p_min_p_restrict_support():
    assert support(make_sampler(1.0, top_k=1, seed=0), LOGITS) == {0}
    assert support(make_sampler(1.0, top_k=2, seed=0), LOGITS) == {0, 1}
    assert support(make_sampler(1.0, top_p=0.4, seed=0), LOGITS) == {0}
    assert support(make_sampler(1.0, top_p=0.7, seed=0), LOGITS) == {0, 1}
    assert support(make_sampler(1.0, top_p=0.9, seed=0), LOGITS) == {0, 1, 2}
    assert support(make_sampler(1.0, min_p=0.5, seed=0), LOGITS) == {0, 1}  # p >= 0.25
    assert support(make_sampler(1.0, min_p=0.2, seed=0), LOGITS) == {0, 1, 2}  # p >= 0.1
    assert support(make_sampler(1.0, top_k=3, top_p=0.7, min_p=0.9, seed=0), LOGITS) == {0}
    assert support(make_sampler(1.0, seed=0), LOGITS) == {0, 1, 2, 3}


def test_high_temperature_flattens_low_sharpens():
    hot = make_sampler(temperature=100.0, seed=0)(np.repeat(LOGITS, 4000, axis=0))
    cold = make_sampler(temperature=0.05, seed=0)(np.repeat(LOGITS, 4000, axis=0))
    assert np.bincount(hot, minlength=4).min() > 800
    assert (cold == 0).mean() > 0.99


def test_seed_reproducible():
    logits = np.random.default_rng(1).normal(size=(3, 100))

    def draws(seed, steps=20):
        sampler = make_sampler(0.8, top_p=0.95, seed=seed)  # one generator, advanced by every call
        return [sampler(logits).tolist() for _ in range(steps)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_repetition_penalty_matches_transformers_rule():
    (proc,) = make_logits_processors(repetition_penalty=2.0)
    logits = np.array([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    out = proc([[0, 1, 1], []], logits)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]]
    assert logits[0, 0] == 2.0  # input untouched
    assert make_logits_processors(repetition_penalty=1.0) == []
    assert make_logits_processors() == []


def test_repetition_penalty_against_transformers_formula_random():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 30))
    seen = [3, 3, 7, 29, 0]
    (proc,) = make_logits_processors(repetition_penalty=1.3)
    out = proc([seen], logits)
    expect = logits.copy()
    for t in set(seen):
        s = expect[0, t]
        expect[0, t] = s * 1.3 if s < 0 else s / 1.3
    np.testing.assert_allclose(out, expect)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"seed": -1}, "seed"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_invalid_sampler_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(**kwargs)


@pytest.mark.parametrize("penalty", [0.0, -1.0, math.nan, math.inf])
def test_invalid_repetition_penalty(penalty):
    with pytest.raises(ValueError, match="repetition_penalty"):
        make_logits_processors(repetition_penalty=penalty)


def test_log_softmax():
    out = log_softmax(LOGITS)
    np.testing.assert_allclose(np.exp(out), PROBS[None, :], rtol=1e-12)
    big = np.array([[1000.0, 0.0]])
    assert np.isfinite(log_softmax(big)).all()


def _nucleus_by_full_sort(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus as a stable sort of the whole vocabulary defines it (the form nucleus() replaces)."""
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    drop_sorted = (np.cumsum(sorted_p) - sorted_p) >= top_p
    drop = np.zeros_like(drop_sorted)
    drop[order] = drop_sorted
    return np.where(drop, 0.0, probs)


@pytest.mark.parametrize("shape", ["peaked", "flat", "ties", "peaked-ties", "masked", "one-hot"])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999999])
def test_nucleus_equals_a_full_stable_sort(shape, top_p):
    from onnxlm.runtime.sampling import nucleus

    rng = np.random.default_rng(7)
    vocab = 49152
    for _ in range(3):
        x = rng.normal(0, 3.0 if shape == "peaked" else 0.05, vocab)  # flat: the nucleus spans thousands
        if shape == "ties":  # a flat distribution of a few distinct values: the full sort
            x = np.round(x * 4) / 4
        if shape == "peaked-ties":  # a peaked one with equal values at the cut, inside the candidates
            x = np.round(rng.normal(0, 3.0, vocab) * 2) / 2
        if shape == "masked":  # top_k's -inf: zeros past the 100 most likely
            x[np.argsort(x)[:-100]] = -np.inf
        if shape == "one-hot":
            x = np.full(vocab, -np.inf)
            x[123] = 0.0
        p = np.exp(x - x.max())
        p /= p.sum()
        kept = np.zeros_like(p)
        kept[nucleus(p, top_p)] = p[nucleus(p, top_p)]
        assert np.array_equal(kept, _nucleus_by_full_sort(p, top_p))


def _sampler_before(temperature, top_k, top_p, min_p, seed):
    """The sampler as written before its buffers and partial sort (every step a fresh array)."""
    rng = np.random.default_rng(seed)

    def sample(logits):
        x = np.asarray(logits, dtype=np.float64) / temperature
        if 0 < top_k < x.shape[-1]:
            kth = np.partition(x, -top_k, axis=-1)[:, -top_k, None]
            x = np.where(x < kth, -np.inf, x)
        probs = np.exp(x - x.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        if top_p < 1.0:
            probs = np.stack([_nucleus_by_full_sort(row, top_p) for row in probs])
        if min_p > 0.0:
            probs = np.where(probs < min_p * probs.max(axis=-1, keepdims=True), 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
        cdf = np.cumsum(probs, axis=-1)
        u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf <= u).sum(axis=-1), probs.shape[-1] - 1)

    return sample


@pytest.mark.parametrize(
    "params",
    [(0.8, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 50, 1.0, 0.0), (1.3, 40, 0.95, 0.05), (0.5, 0, 0.5, 0.1)],
)
def test_seeded_draws_are_the_same_as_before_the_buffers_and_partial_sort(params):
    temperature, top_k, top_p, min_p = params
    rng = np.random.default_rng(3)
    fast = make_sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=11)
    slow = _sampler_before(temperature, top_k, top_p, min_p, seed=11)
    for scale, shape in ((2.0, (2, 4096)), (0.05, (1, 49152)), (4.0, (3, 49152))):
        logits = rng.normal(0, scale, shape).astype(np.float32)
        for _ in range(20):
            assert fast(logits).tolist() == slow(logits).tolist()


@pytest.mark.parametrize("spread", [0.05, 3.0, 100.0])  # 100: fewer than k within either margin
@pytest.mark.parametrize("k", [1, 40, 5000])
def test_kth_largest_is_a_partition_of_the_whole(spread, k):
    from onnxlm.runtime.sampling import kth_largest

    rng = np.random.default_rng(5)
    for ties in (False, True):
        x = rng.normal(0, spread, 49152)
        if ties:
            x = np.round(x)
        x[:10] = -np.inf  # masked logits stay out of the way
        assert kth_largest(x, k, np.empty_like(x)) == np.partition(x, len(x) - k)[len(x) - k]
