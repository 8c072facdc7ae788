"""Reuse across requests: an image-feature cache and a store of prefilled key/value states.

Both are byte-budgeted LRU maps (`ByteBudgetLRU`). An entry larger than the whole budget is not
kept; a budget of 0 turns the cache off. They hold references to the arrays the graphs returned,
never copies.

Identity is by content, never by token ids alone: image placeholders are the same token for every
image, so a key/value state is matched on its token ids *and* on the hash of every image it holds
(`ImageKey`, the decoded pixels plus everything that decides the features: tiling parameters, the
tile budget and the vision graph's identity). Two different images with the same size and tiling
therefore never share features or keys/values.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from nvlm_export.defaults import REUSE_CACHE_MIB
from nvlm_export.errors import InputError

DEFAULT_FEATURE_CACHE_BYTES = REUSE_CACHE_MIB * 2**20
DEFAULT_PREFIX_CACHE_BYTES = REUSE_CACHE_MIB * 2**20

ImageKey = str  # hex digest of an image's pixels and the settings that shape its features
Value = TypeVar("Value")


def image_key(image: Image.Image, tiling: Mapping[str, object], vision_identity: str) -> ImageKey:
    """The cache key of one decoded RGB image under `tiling` (tile size, budget, thumbnail…)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([image.mode, image.size, dict(tiling), vision_identity]).encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class CacheStats:
    """Counters of one cache since it was created (`bytes` and `entries` are current)."""

    budget_bytes: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    peak_bytes: int = 0
    entries: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ByteBudgetLRU(Generic[Value]):
    """A least-recently-used map whose values' sizes (`size_of`) stay within `budget_bytes`."""

    def __init__(self, budget_bytes: int, size_of: Callable[[Value], int]) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise InputError(
                f"A cache budget of {budget_bytes!r} bytes is invalid",
                fix="Use a whole number of bytes >= 0 (0 turns the cache off)",
            )
        self._entries: OrderedDict[object, tuple[Value, int]] = OrderedDict()
        self._size_of = size_of
        self.stats = CacheStats(budget_bytes)

    @property
    def enabled(self) -> bool:
        return self.stats.budget_bytes > 0

    def get(self, key: object) -> Value | None:
        """The value for `key` (now the most recently used), counting a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    def touch(self, key: object) -> None:
        """Mark `key` as just used (no hit is counted: the caller found it by scanning)."""
        if key in self._entries:
            self._entries.move_to_end(key)

    def put(self, key: object, value: Value) -> None:
        """Keep `value`, evicting the least recently used entries until it fits the budget."""
        size = self._size_of(value)
        self._remove(key)
        if size > self.stats.budget_bytes:
            return
        while self.stats.bytes + size > self.stats.budget_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.stats.evictions += 1
        self._entries[key] = (value, size)
        self.stats.bytes += size
        self.stats.entries = len(self._entries)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes)

    def values(self) -> Iterator[tuple[object, Value]]:
        return ((key, value) for key, (value, _) in self._entries.items())

    def discard(self, key: object) -> None:
        self._remove(key)

    def clear(self) -> None:
        self._entries.clear()
        self.stats.bytes = self.stats.entries = 0

    def _remove(self, key: object) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.stats.bytes -= entry[1]
            self.stats.entries = len(self._entries)


Features = Mapping[str, np.ndarray]  # one image's vision outputs by name, each [tiles, 256, D]


class FeatureCache(ByteBudgetLRU[Features]):
    """Vision outputs by `ImageKey`, shared by every request of a pipeline."""

    def __init__(self, budget_bytes: int = DEFAULT_FEATURE_CACHE_BYTES) -> None:
        super().__init__(budget_bytes, lambda features: sum(a.nbytes for a in features.values()))


@dataclass(frozen=True, eq=False)
class CrossState:
    """The cross-attention keys/values of a request's cross sequence (NVLM-X/H), and what made
    them: the cross token ids and the images whose tiles fill it, in order."""

    token_ids: np.ndarray  # int64 [K]
    images: tuple[ImageKey, ...]
    key_values: Mapping[str, np.ndarray]  # cross_kv.{j}.key / .value, each [1, KV, K, hd]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.key_values.values())

    def extended_by(self, token_ids: np.ndarray, images: Sequence[ImageKey]) -> bool:
        """Whether a cross sequence of `token_ids` from `images` starts with this one."""
        length = len(self.token_ids)
        return (
            bool(self.images)
            and tuple(images[: len(self.images)]) == self.images
            and len(token_ids) >= length
            and np.array_equal(token_ids[:length], self.token_ids)
        )


@dataclass(frozen=True, eq=False)
class KVState:
    """The decoder's self-attention keys/values after `token_ids`, and the images among them
    (`image_starts[i]` is image i's first token: from there on tokens depend on its pixels)."""

    token_ids: np.ndarray  # int64 [L]
    images: tuple[ImageKey, ...]
    image_starts: tuple[int, ...]
    keys: tuple[np.ndarray, ...]  # per layer [1, kv_heads, L, head_dim]
    values: tuple[np.ndarray, ...]
    cross: CrossState | None = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        kv = sum(a.nbytes for a in (*self.keys, *self.values))
        object.__setattr__(self, "nbytes", kv + (self.cross.nbytes if self.cross else 0))

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def shared_prefix(
        self, token_ids: np.ndarray, images: Sequence[ImageKey], image_starts: Sequence[int]
    ) -> int:
        """How many leading tokens of a request (its ids, image keys and image start tokens)
        this state has computed exactly as the request would: equal ids, and every image that
        starts inside that span the same image at the same place."""
        length = min(self.length, len(token_ids))
        differ = np.flatnonzero(self.token_ids[:length] != token_ids[:length])
        shared = int(differ[0]) if len(differ) else length
        theirs = list(zip(images, image_starts, strict=True))
        mine = list(zip(self.images, self.image_starts, strict=True))
        for index in range(max(len(theirs), len(mine))):
            pair = theirs[index : index + 1] + mine[index : index + 1]
            start = min(s for _, s in pair)
            if start >= shared:
                break
            if len(pair) < 2 or pair[0] != pair[1]:
                return int(start)
        return shared


class PrefixCache(ByteBudgetLRU[KVState]):
    """Prefilled key/value states, found by the longest prefix they share with a request."""

    def __init__(self, budget_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
        super().__init__(budget_bytes, lambda state: state.nbytes)

    def longest(
        self,
        token_ids: np.ndarray,
        images: Sequence[ImageKey],
        image_starts: Sequence[int],
        also: Sequence[KVState] = (),
    ) -> tuple[KVState | None, int]:
        """The state sharing the longest prefix with the request (among the kept ones and
        `also`) and that length; counts a hit when some prefix is shared."""
        best: tuple[KVState | None, int] = (None, 0)
        best_key: object = None
        candidates = [(None, s) for s in also] + list(self.values())
        for key, state in candidates:
            shared = state.shared_prefix(token_ids, images, image_starts)
            if shared > best[1]:
                best, best_key = (state, shared), key
        if best[0] is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
            self.touch(best_key)
        return best
