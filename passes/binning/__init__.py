"""kmeans, uniform, adaptive, gmm, ternary, binary: weights share a few values per group.

One engine (`engine.BinningPass`) does everything but the fit: it selects weights (include/exclude,
min_size, and the skips every lossy pass needs), lays each one out per tensor, per output
channel or per block of an output channel (`graphpass.lowering.lookup.Layout`), fits a codebook for
every group with the numeric engine `graphpass.binning`, and replaces the weight by a lookup
(`graphpass.lowering.lookup`): packed indices plus a small table, rebuilt in the graph. The passes in
`methods` only say how they fit and which options they add; `uniform` also lowers its even grid
to DequantizeLinear and to the compressed kernels.

Every pass here is a `graphpass.codec.WeightCodec`: `plan(ctx, weight)` fits one weight and
returns its exact reconstruction (what onnxruntime will compute), its real stored bytes (from
emitting once into a scratch replacement) and the emitter; `call` plans every selected weight
on the run's workers (`--jobs`) and applies the plans in order. `auto` plans many settings per
weight and applies only the ones it keeps.

With `feedback=true` every method first fits its codebooks as usual (kmeans weighted by the
energy of each value's input, the Hessian's diagonal), then assigns each value an entry column
by column with error feedback (`graphpass.feedback`, H from the run's calibration inputs): the
layout and codebook sizes, and so the file size, are those without feedback.

Spec syntax: `include=` and `exclude=` take `|`-separated tokens (commas separate options); a
token matches a weight when one of its readers has that op type (MatMul, Gemm, Conv, Gather,
...) or when the weight's name matches it as an fnmatch pattern (`*.attn.*`).

Costs to keep in mind: a codebook row costs k entries, so per-channel and per-group codebooks
pay k * 32 bits per row (codebook_dtype=float16: 16; uint8: 8, and 32 for the row's scale and
offset); a weight whose predicted lookup is not smaller is left alone.
`uniform(lower=dequantize)` stores a scale and zero point per group instead; onnxruntime fuses
a blocked UINT4 DequantizeLinear + MatMul (opset >= 21) into MatMulNBits, whose default
accuracy_level 4 quantizes activations to int8: expect output drift of ~1e-2 relative at
ORT_ENABLE_ALL that ORT_DISABLE_ALL does not show.
"""

from graphpass.passes.binning import methods, uniform  # noqa: F401  (registers the passes)
from graphpass.passes.binning.engine import BinningPass, FitTask, fit_weight

__all__ = ["BinningPass", "FitTask", "fit_weight"]
