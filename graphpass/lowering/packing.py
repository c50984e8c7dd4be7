"""Index packing: how indices below k are stored, and the nodes that unpack them.

Chosen per tensor, never raising the model's opset (see `choose_packing`): native UINT4
(opset >= 21) and UINT2 (opset >= 25), which onnxruntime casts directly; otherwise several
indices per uint8/uint16/int32 word as base-k digits, unpacked with Div and Mod on int32 (valid
from opset 11, so opset-13 models work; BitShift with BitwiseAnd was at most 20% faster and
needs opset 18). Base-k digits also pack non-power-of-two k tighter than bits: k=3 takes 1.6
bits, k=5 2.46 bits, k=8 3.2 bits per index.

Where digits waste bits (k=64: five 6-bit digits in 31 usable bits of an int32 are 6.4 bits per
index; k=32 5.33; k=128 a whole byte), an index of b bits is split into bit planes whose widths
are the powers of two that sum to b (6 = 4 + 2), each packed exactly (4-bit digits two to a
byte, 2-bit four, 1-bit eight; UINT4/UINT2 where the opset has them) and added back together
(`Planes`): b bits per index. On magika's Conv [512, 256, 5, 1] at 6 bits per channel that is
32 KB, 1% of the model. Each plane's nodes and constants cost the file bytes too, so planes
are taken only where they save more than PLANE_OVERHEAD_BYTES per extra plane: on the README's
example (20 weights of up to 16K values at 6 bits) planes everywhere saved 2.7 KB of indices
and added 4.8 KB of nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto

from graphpass.lowering.layout import element_count
from graphpass.lowering.nodes import LUT_ROLE_PREFIX, int64s
from graphpass.weights import Replacement

# GatherElements is opset 11 (Mod is 10, Slice with input bounds 10).
MIN_OPSET = 11
# onnxruntime's Cast from UINT4 needs opset 21 (and UINT4 needs IR 10).
UINT4_MIN_OPSET, UINT4_MIN_IR = 21, 10
# UINT2 arrived in opset 25 / IR 11; onnxruntime 1.32 casts it from opset 25 on.
UINT2_MIN_OPSET, UINT2_MIN_IR = 25, 11

_HAS_UINT2 = hasattr(TensorProto, "UINT2") and hasattr(ml_dtypes, "uint2")

# What one more bit plane adds to a file besides its indices (its unpacking nodes, the Mul and
# Add joining it, their constants and names): planes must save more than this per extra plane.
PLANE_OVERHEAD_BYTES = 1024


@dataclass(frozen=True)
class Packing:
    """How indices below `base` are stored.

    `native`: one index per element of `dtype` (uint8, uint16, or the sub-byte UINT4/UINT2,
    which onnxruntime casts directly). Otherwise `per_word` base-`base` digits per element of
    `dtype` (uint8, uint16 or int32), unpacked with Div and Mod.
    """

    name: str
    dtype: np.dtype
    element_bits: int
    per_word: int = 1
    base: int = 0

    @property
    def native(self) -> bool:
        return self.per_word == 1

    @property
    def bits_per_index(self) -> float:
        return self.element_bits / self.per_word

    def stored_bytes(self, count: int) -> int:
        words = -(-count // self.per_word)
        return (words * self.element_bits + 7) // 8


@dataclass(frozen=True)
class Planes:
    """Indices below 2**sum(widths) stored as bit planes, most significant first: plane i holds
    (index >> shift_i) & (2**widths[i] - 1), packed by `parts[i]` (base 2**widths[i], exact)."""

    widths: tuple[int, ...]
    parts: tuple[Packing, ...]

    @property
    def name(self) -> str:
        return "planes(" + "+".join(part.name for part in self.parts) + ")"

    @property
    def native(self) -> bool:
        return False

    @property
    def bits_per_index(self) -> float:
        return sum(part.bits_per_index for part in self.parts)

    def stored_bytes(self, count: int) -> int:
        return sum(part.stored_bytes(count) for part in self.parts)

    def split(self, indices: np.ndarray) -> list[np.ndarray]:
        """Each plane's values, most significant first."""
        indices = np.asarray(indices, dtype=np.int64)
        shifts = np.cumsum((self.widths[1:] + (0,))[::-1])[::-1]
        return [(indices >> int(shift)) & ((1 << width) - 1) for shift, width in zip(shifts, self.widths)]


def _native(name: str, dtype, bits: int) -> Packing:
    return Packing(name, np.dtype(dtype), bits)


# Word types for base-k digits, with the exclusive bound of a word's value. int32 words stay
# below 2**31 so that Div and Mod run on int32 without a sign problem.
_DIGIT_WORDS = ((np.uint8, 8, 2**8), (np.uint16, 16, 2**16), (np.int32, 32, 2**31))


def choose_packing(k: int, opset: int, ir_version: int, *, whole_bytes: bool = False,
                   planes: bool = True, count: int | None = None) -> Packing | Planes:
    """The smallest storage for indices in [0, k) that the model's opset and IR can read.

    Ties go to the native types, whose unpacking is a single Cast, then to digits over bit
    planes (one stored array instead of several). `whole_bytes` leaves out UINT4/UINT2, which
    onnxruntime cannot Gather rows of, and bit planes, which a row Gather would read several of;
    `planes` false leaves out bit planes alone. With `count` (how many indices) bit planes must
    also save more than PLANE_OVERHEAD_BYTES per extra plane; without it the bits decide.
    """
    if whole_bytes:
        ir_version = min(ir_version, UINT4_MIN_IR - 1)
    if opset < MIN_OPSET:
        raise ValueError(f"lookups need opset >= {MIN_OPSET}, the model has {opset}")
    if k > 2**16:
        raise ValueError(f"at most 65536 codebook entries, got {k}")
    base = max(int(k), 2)
    candidates = [_native("uint8", np.uint8, 8) if base <= 256 else _native("uint16", np.uint16, 16)]
    if base <= 16 and opset >= UINT4_MIN_OPSET and ir_version >= UINT4_MIN_IR:
        candidates.append(_native("uint4", ml_dtypes.uint4, 4))
    if _HAS_UINT2 and base <= 4 and opset >= UINT2_MIN_OPSET and ir_version >= UINT2_MIN_IR:
        candidates.append(_native("uint2", ml_dtypes.uint2, 2))
    for dtype, bits, bound in _DIGIT_WORDS:
        per_word = digits_per_word(base, bound)
        if per_word >= 2:
            name = f"base{base}x{per_word}/{np.dtype(dtype).name}"
            candidates.append(Packing(name, np.dtype(dtype), bits, per_word, base))
    best = min(candidates, key=lambda p: (p.bits_per_index, not p.native, p.element_bits))
    split = None if whole_bytes or not planes else _planes(base, opset, ir_version)
    if split is None or split.bits_per_index >= best.bits_per_index:
        return best
    if count is not None and best.stored_bytes(count) - split.stored_bytes(count) <= \
            PLANE_OVERHEAD_BYTES * (len(split.parts) - 1):
        return best
    return split


def _planes(base: int, opset: int, ir_version: int) -> Planes | None:
    """Bit planes for indices below `base`: widths the binary digits of ceil(log2(base)), so that
    each plane packs exactly (a width of 1, 2, 4, 8 or 16 bits). None for a single plane, which
    is one of choose_packing's own candidates."""
    bits = max(1, math.ceil(math.log2(base)))
    widths = tuple(1 << i for i in reversed(range(bits.bit_length())) if bits & (1 << i))
    if len(widths) < 2:
        return None
    return Planes(widths, tuple(choose_packing(2**width, opset, ir_version) for width in widths))


def digits_per_word(base: int, bound: int) -> int:
    count = int(math.log(bound, base))
    while base ** (count + 1) <= bound:  # log() may round down an exact power
        count += 1
    while base**count > bound:
        count -= 1
    return count


def pack_indices(indices: np.ndarray, packing: Packing | Planes) -> np.ndarray | tuple[np.ndarray, ...]:
    """The array to store: native packings keep the indices' shape, digit packings give [words, 1]
    (the trailing 1 lets Div broadcast against the digit powers without an Unsqueeze); bit
    planes give one such array per plane."""
    if isinstance(packing, Planes):
        return tuple(pack_indices(plane, part) for plane, part in zip(packing.split(indices), packing.parts))
    if packing.native:
        return np.asarray(indices).astype(packing.dtype)
    flat = np.asarray(indices, dtype=np.int64).ravel()
    padded = np.zeros(-(-flat.size // packing.per_word) * packing.per_word, dtype=np.int64)
    padded[: flat.size] = flat
    powers = packing.base ** np.arange(packing.per_word, dtype=np.int64)
    words = padded.reshape(-1, packing.per_word) @ powers
    return words.astype(packing.dtype).reshape(-1, 1)


def unpack_indices(stored, packing: Packing | Planes, shape) -> np.ndarray:
    """numpy mirror of the unpacking nodes (for tests and accounting checks)."""
    if isinstance(packing, Planes):
        index = np.zeros(shape, dtype=np.int64)
        for part, width, plane in zip(packing.parts, packing.widths, stored):
            index = (index << width) + unpack_indices(plane, part, shape)
        return index
    if packing.native:
        return np.asarray(stored).astype(np.int64).reshape(shape)
    powers = packing.base ** np.arange(packing.per_word, dtype=np.int64)
    digits = (np.asarray(stored, dtype=np.int64) // powers) % packing.base
    return digits.ravel()[: element_count(shape)].reshape(shape)


def emit_indices(r: Replacement, indices: np.ndarray, k: int, opset: int, ir_version: int) -> str:
    """Store `indices` (integers in [0, k)) packed; return an int32 tensor of their shape.

    The int32 result feeds GatherElements or Gather directly.
    """
    packing = choose_packing(k, opset, ir_version, count=int(np.size(indices)))
    if isinstance(packing, Planes):
        return _emit_planes(r, indices, packing)
    return _emit_packed(r, indices, packing)


def _emit_planes(r: Replacement, indices: np.ndarray, planes: Planes) -> str:
    """index = (...(plane_0 * 2**w_1 + plane_1) * 2**w_2 + ...), on int32."""
    index = None
    for plane, part, width in zip(planes.split(indices), planes.parts, planes.widths):
        value = _emit_packed(r, plane, part)
        if index is not None:
            scale = r.stored(f"{LUT_ROLE_PREFIX}plane_scale", np.array(1 << width, dtype=np.int32))
            shifted = r.node("Mul", [index, scale], f"{LUT_ROLE_PREFIX}plane_shifted")
            value = r.node("Add", [shifted, value], f"{LUT_ROLE_PREFIX}plane_sum")
        index = value
    return index


def _emit_packed(r: Replacement, indices: np.ndarray, packing: Packing) -> str:
    stored = r.stored(f"{LUT_ROLE_PREFIX}indices", pack_indices(indices, packing))
    if packing.native:
        return r.node("Cast", [stored], f"{LUT_ROLE_PREFIX}index", to=TensorProto.INT32)
    return _unpack_digits(r, stored, packing, tuple(np.shape(indices)))


def _unpack_digits(r: Replacement, stored: str, packing: Packing, shape: tuple[int, ...]) -> str:
    words = stored
    if packing.dtype != np.int32:
        words = r.node("Cast", [stored], f"{LUT_ROLE_PREFIX}words", to=TensorProto.INT32)
    powers = r.stored(f"{LUT_ROLE_PREFIX}powers", packing.base ** np.arange(packing.per_word, dtype=np.int32))
    base = r.stored(f"{LUT_ROLE_PREFIX}base", np.array(packing.base, dtype=np.int32))
    shifted = r.node("Div", [words, powers], f"{LUT_ROLE_PREFIX}shifted")  # [words, per_word]
    digits = r.node("Mod", [shifted, base], f"{LUT_ROLE_PREFIX}digits")
    count = element_count(shape)
    if -(-count // packing.per_word) * packing.per_word != count:  # drop the padding digits
        flat = r.node("Reshape", [digits, int64s(r, "flat_shape", [-1])], f"{LUT_ROLE_PREFIX}flat")
        digits = r.node(
            "Slice", [flat, int64s(r, "starts", [0]), int64s(r, "ends", [count])], f"{LUT_ROLE_PREFIX}trimmed"
        )
    return r.node("Reshape", [digits, int64s(r, "index_shape", list(shape))], f"{LUT_ROLE_PREFIX}index")

