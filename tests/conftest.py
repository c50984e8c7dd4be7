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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    """Every generated fixture model, written once per test session."""
    out = tmp_path_factory.mktemp("fixtures")
    generator = load_fixture_module()
    for name in generator.FIXTURES:
        (out / f"{name}.onnx").write_bytes(generator.build(name).SerializeToString(deterministic=True))
    return out
