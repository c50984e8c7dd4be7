"""Analyses that several passes and `inspect` share, computed once per model state.

Each is an `Analysis` subclass; `ctx.analysis(Kind)` returns the cached result until a pass
edits the model.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from graphpass.manager import Analysis, PassContext
from graphpass.scopes import Scope
from graphpass.weights import WeightRef

# hashlib and numpy release the GIL on large buffers, so two threads use both cores.
_WORKERS = 2


def weight_bytes_view(weight: WeightRef) -> memoryview:
    """The weight's values as raw bytes, however the file stored them."""
    return memoryview(np.ascontiguousarray(weight.read())).cast("B")


@dataclass(frozen=True)
class Fingerprint:
    dtype: int
    shape: tuple[int, ...]
    digest: bytes


class WeightFingerprints(Analysis):
    """A content hash per weight; equal fingerprints mean equal bytes, shape and dtype."""

    @classmethod
    def compute(cls, ctx: PassContext) -> dict[WeightRef, Fingerprint]:
        weights = ctx.model.weights()
        with ctx.progress("fingerprinting weights", len(weights)) as advance, ThreadPoolExecutor(_WORKERS) as pool:
            digests = []
            for digest in pool.map(_digest, weights):
                digests.append(digest)
                advance(1)
        return {w: Fingerprint(w.dtype, w.shape, d) for w, d in zip(weights, digests)}


def _digest(weight: WeightRef) -> bytes:
    return hashlib.blake2b(weight_bytes_view(weight), digest_size=16).digest()


@dataclass
class DuplicateGroup:
    """Weights with identical bytes, dtype and shape."""

    members: list[WeightRef]

    @property
    def saved_bytes(self) -> int:
        return self.members[0].nbytes * (len(self.members) - 1)


class ExactDuplicates(Analysis):
    """Groups of byte-identical weights, hashed first and then confirmed byte for byte."""

    @classmethod
    def compute(cls, ctx: PassContext) -> list[DuplicateGroup]:
        prints = ctx.analysis(WeightFingerprints)
        buckets: dict[Fingerprint, list[WeightRef]] = defaultdict(list)
        for weight in ctx.model.weights():
            buckets[prints[weight]].append(weight)
        groups = []
        for members in buckets.values():
            if len(members) > 1:
                groups.extend(_confirm_identical(members))
        return groups


def _confirm_identical(members: list[WeightRef]) -> list[DuplicateGroup]:
    """Split a hash bucket into groups whose bytes really match (a collision stays apart)."""
    groups: list[tuple[bytes, list[WeightRef]]] = []
    for weight in members:
        data = bytes(weight_bytes_view(weight))
        for reference, group in groups:
            if reference == data:
                group.append(weight)
                break
        else:
            groups.append((data, [weight]))
    return [DuplicateGroup(group) for _, group in groups if len(group) > 1]


def common_scope(scopes: list[Scope]) -> Scope | None:
    """The innermost scope that encloses all of them, or None when they share no root."""
    candidates = list(scopes[0].ancestors())
    for scope in candidates:
        if all(scope.encloses(other) for other in scopes):
            return scope
    return None
