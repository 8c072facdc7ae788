"""Next-token choice: greedy ties, temperature, top-k, top-p, seeding and argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from nvlm_export.errors import InputError
from nvlm_export.runtime.sampling import sample_next_token


def draws(logits: np.ndarray, n: int = 400, seed: int = 0, **options: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([sample_next_token(logits, rng=rng, **options) for _ in range(n)])


def test_greedy_picks_the_first_maximum_like_torch_argmax() -> None:
    logits = np.array([0.5, 3.0, -1.0, 3.0], dtype=np.float32)
    assert sample_next_token(logits) == 1
    assert sample_next_token(logits, temperature=1.5, top_k=1) == 1


def test_sampling_follows_temperature() -> None:
    logits = np.array([2.0, 1.0, 0.0])
    sharp = np.bincount(draws(logits, temperature=0.2), minlength=3)
    flat = np.bincount(draws(logits, temperature=5.0), minlength=3)
    assert sharp[0] > 380  # p(0) = 0.993 at T=0.2
    assert flat.min() > 80  # nearly uniform at T=5


def test_sampling_frequencies_match_the_softmax() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    counts = np.bincount(draws(logits, n=4000, temperature=1.0), minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


@pytest.mark.parametrize("temperature", [1e-308, 1e-30, 1e-3])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_tiny_temperature_picks_the_most_likely_token(temperature: float, top_p: float) -> None:
    """Not the least likely one (logits / 1e-308 overflow to inf), and no crash with top-p."""
    logits = np.array([2.0, 30.0, 1.0], dtype=np.float32)
    assert set(draws(logits, n=20, temperature=temperature, top_p=top_p)) == {1}


def test_top_k_never_leaves_the_k_most_likely() -> None:
    logits = np.array([0.0, 1.0, 0.9, 0.1, 0.8, 0.2])
    assert set(draws(logits, temperature=10.0, top_k=3)) == {1, 2, 4}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    logits = np.log(np.array([0.05, 0.5, 0.3, 0.15]))
    # 0.5 + 0.3 = 0.8 < 0.85, so the 0.15 token is needed too; 0.05 never appears.
    assert set(draws(logits, temperature=1.0, top_p=0.85)) == {1, 2, 3}
    assert set(draws(logits, temperature=1.0, top_p=0.75)) == {1, 2}


def test_tiny_top_p_equals_greedy() -> None:
    logits = np.random.default_rng(1).normal(size=500)
    assert set(draws(logits, n=50, temperature=1.0, top_p=1e-6)) == {int(np.argmax(logits))}


def test_top_p_on_a_large_vocabulary_matches_the_full_sort() -> None:
    """The partial-sort shortcut for big vocabularies must not change which tokens can appear."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=5000) * 4
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1].tolist())
    assert set(draws(logits, n=2000, temperature=1.0, top_p=0.5)) <= nucleus
    flat = np.zeros(5000)  # a nucleus bigger than the shortcut's first probe size
    assert len(set(draws(flat, n=500, temperature=1.0, top_p=0.9))) > 400
    plateau = np.full(40000, -30.0)  # 5000 likely tokens in a vocabulary beyond both probes
    likely = rng.choice(40000, size=5000, replace=False)
    plateau[likely] = 0.0
    drawn = set(draws(plateau, n=60, temperature=1.0, top_p=0.9).tolist())
    assert drawn <= set(likely.tolist()) and len(drawn) > 45


def test_same_seed_same_draws_different_seed_different_draws() -> None:
    logits = np.zeros(1000)
    first = draws(logits, n=20, seed=7, temperature=1.0)
    assert np.array_equal(first, draws(logits, n=20, seed=7, temperature=1.0))
    assert not np.array_equal(first, draws(logits, n=20, seed=8, temperature=1.0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -0.1}, "Temperature -0.1 is invalid"),
        ({"temperature": float("nan")}, "Temperature nan is invalid"),
        ({"top_k": -1}, "top_k -1 is invalid"),
        ({"top_k": 2.5}, "top_k 2.5 is invalid"),
        ({"top_p": 0.0}, "top_p 0.0 is invalid"),
        ({"top_p": 1.5}, "top_p 1.5 is invalid"),
    ],
)
def test_invalid_options_are_input_errors(options: dict[str, float], message: str) -> None:
    with pytest.raises(InputError, match=message):
        sample_next_token(
            np.zeros(4),
            temperature=options.get("temperature", 1.0),
            **{k: v for k, v in options.items() if k != "temperature"},
        )
