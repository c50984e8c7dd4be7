"""Lowerings: how a codec's values become ONNX nodes that a given runtime runs well.

A codec (graphpass/codec.py) decides what values a weight takes: a codebook and indices, an
affine grid. A lowering decides which ONNX represents them: a plain-op lookup that runtimes
rebuild dense at load (`lookup`), or the operators a runtime keeps compressed in memory. The
run's `Deployment` (objective and target runtimes) chooses among them, so passes never branch
on a runtime.
"""
