"""Choosing the next token from one position's logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import numpy as np

from nvlm_export.errors import InputError

# Top-p first sorts only the most likely tokens: a full sort of a 152k vocabulary costs ~10 ms
# per token, and a real model's nucleus is almost always far smaller than these probe sizes.
_NUCLEUS_PROBES = (1024, 16384)


def check_sampling_options(*, temperature: float, top_k: int, top_p: float) -> None:
    """Raise InputError for options no sampler can honour."""
    if not np.isfinite(temperature) or temperature < 0:
        raise InputError(
            f"Temperature {temperature} is invalid",
            why="it must be a finite number >= 0",
            fix="Use 0 for greedy decoding or a positive value such as 0.7",
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 0:
        raise InputError(
            f"top_k {top_k!r} is invalid",
            why="it must be an integer >= 0",
            fix="Use 0 to disable top-k",
        )
    if not 0 < top_p <= 1:
        raise InputError(
            f"top_p {top_p} is invalid",
            why="it must be in (0, 1]",
            fix="Use 1.0 to disable nucleus sampling",
        )


# Seeds are what numpy's generators and the C API (uint64_t) take.
MAX_SEED = 2**64 - 1


def check_seed(seed: int | None) -> None:
    """Raise InputError unless `seed` is None or an integer numpy and the C API can take."""
    if seed is None:
        return
    if (
        isinstance(seed, bool)
        or not isinstance(seed, int | np.integer)
        or not 0 <= seed <= MAX_SEED
    ):
        raise InputError(
            f"Seed {seed!r:.40} is invalid",
            why=f"a seed is an integer from 0 to {MAX_SEED}",
            fix="Use a non-negative integer such as 0",
        )


def is_greedy(*, temperature: float, top_k: int) -> bool:
    return temperature == 0 or top_k == 1


def sample_next_token(
    logits: np.ndarray,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: np.random.Generator | None = None,
) -> int:
    """Pick one token id from `logits` [vocab].

    Greedy (the first maximum, like torch.argmax) when temperature is 0 or top_k is 1; otherwise
    softmax(logits / temperature) restricted to the top_k tokens and then to the smallest set whose
    probability reaches top_p (always at least one token), sampled with `rng`.
    """
    check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p)
    if is_greedy(temperature=temperature, top_k=top_k):
        return int(np.argmax(logits))
    rng = rng if rng is not None else np.random.default_rng()
    logits = np.asarray(logits, dtype=np.float64)
    # Shifted before scaling: a tiny temperature then sends every other token to -inf (a greedy
    # pick) instead of overflowing the largest logits to inf.
    with np.errstate(over="ignore"):
        scaled = (logits - logits.max()) / temperature  # (V,), <= 0
    candidates = _top_k_ids(scaled, top_k)  # (K,) ids, or None for all
    pool = scaled if candidates is None else scaled[candidates]
    probs = _softmax(pool)
    if top_p < 1.0:
        keep, probs = _nucleus(probs, top_p)  # (N,) indices into pool, renormalised
        choice = int(keep[_draw(probs, rng)])
    else:
        choice = _draw(probs, rng)
    return choice if candidates is None else int(candidates[choice])


def _top_k_ids(scaled: np.ndarray, top_k: int) -> np.ndarray | None:
    if top_k == 0 or top_k >= scaled.shape[0]:
        return None
    return np.argpartition(scaled, -top_k)[-top_k:]


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max())
    return shifted / shifted.sum()


def _nucleus(probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the smallest most-likely set with mass >= top_p, and their renormalised probs."""
    order = _most_likely_first(probs, top_p)
    sorted_probs = probs[order]
    mass_before = np.cumsum(sorted_probs) - sorted_probs
    kept = mass_before < top_p  # the first token always has mass_before 0, so one is kept
    kept_probs = sorted_probs[kept]
    return order[kept], kept_probs / kept_probs.sum()


def _most_likely_first(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices sorted by descending probability, covering at least `top_p` of the mass."""
    for probe in _NUCLEUS_PROBES:
        if probe >= probs.shape[0]:
            break
        head = np.argpartition(probs, -probe)[-probe:]
        if probs[head].sum() >= top_p:
            return head[np.argsort(-probs[head])]
    return np.argsort(-probs)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    # Inverse-CDF draw: one uniform number per token, cheaper than rng.choice's checks.
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(index, probs.shape[0] - 1)
