"""Weights prepared for clustering (`Member`), the codebooks fitted over them (`Stage`), and
the weight a member's labels rebuild."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from graphpass.lowering import lookup
from graphpass.parallel import Workers
from graphpass.passes.codebook.geometry import VectorLayout
from graphpass.passes.codebook.vector_kmeans import ONE_THREAD, KMeansSettings, kmeans_vectors
from graphpass.weights import WeightRef


@dataclass
class Member:
    """One weight, read, scaled and cut into sub-vectors."""

    weight: WeightRef
    layout: VectorLayout
    original: np.ndarray
    scale_axis: int | None
    scale_entries: np.ndarray | None  # [1.., C, ..1] as stored
    scale: np.ndarray | None  # the same in the weight's dtype: what the Mul multiplies by
    vectors: np.ndarray  # [count, dim] float32, divided by the scale
    importance: np.ndarray | None  # per sub-vector: its squared scale, mean 1 over the tensor

    def for_emit(self) -> Member:
        """The member without its weight-sized arrays: all that emitting needs (layout and
        scale), so that a plan waiting to be applied stays small."""
        return dataclasses.replace(self, original=_NONE, vectors=_NONE, importance=None)


@dataclass
class Stage:
    """One codebook and the labels of every sub-vector of the group it was fitted on."""

    entries: np.ndarray  # [k, dim] in the stored dtype
    values: np.ndarray  # the same cast to the weights' dtype: what the Gather returns
    labels: np.ndarray  # [group's sub-vectors]
    shared_name: str | None = None  # set when the table is stored once for a group

    @property
    def k(self) -> int:
        return len(self.entries)

    def for_emit(self) -> Stage:
        """The stage without the group's labels (each plan holds its own member's)."""
        return dataclasses.replace(self, labels=_NONE)


# Stands in for a weight-sized array that emitting never reads.
_NONE = np.empty(0, dtype=np.float32)


def fit_stages(members: list[Member], settings: KMeansSettings, stages: int, table_type: int,
               workers: Workers = ONE_THREAD) -> list[Stage]:
    """Codebooks fitted once over every member's sub-vectors, stage 2 on stage 1's residual."""
    vectors = np.concatenate([m.vectors for m in members])
    importance = None
    if any(m.importance is not None for m in members):  # scaled, or calibrated for feedback
        importance = np.concatenate([np.ones(m.layout.count) if m.importance is None else m.importance
                                     for m in members])
    weight_type = members[0].weight.dtype
    fitted = []
    for stage in range(stages):
        stage_settings = dataclasses.replace(settings, seed=settings.seed + stage)
        centroids, labels = kmeans_vectors(vectors, importance, stage_settings, workers)
        entries = centroids.astype(lookup.np_dtype(lookup.table_dtype(weight_type, table_type, centroids)))
        values = entries.astype(lookup.np_dtype(weight_type))
        fitted.append(Stage(entries, values, labels))
        vectors = vectors - values[labels].astype(np.float32)  # the next stage codes what is left
    return fitted


def rebuild(member: Member, stage_labels: list[np.ndarray], stages: list[Stage], upto: int | None = None) -> np.ndarray:
    """What the lookup computes, in the weight's dtype and the order the graph adds/multiplies."""
    summed = None
    for stage, labels in list(zip(stages, stage_labels))[:upto]:
        part = stage.values[labels]
        summed = part if summed is None else summed + part
    weight = member.layout.merge(summed)
    return weight * member.scale if member.scale is not None else weight
