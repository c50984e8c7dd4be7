"""Shared pytest helpers for graphpass tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT / "fixtures"


def load_fixture_module() -> ModuleType:
    """Import fixtures/generate.py by path (fixtures/ is not an installed package)."""
    name = "graphpass_fixtures_generate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FIXTURES_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    """Every generated fixture model, written once per test session."""
    out = tmp_path_factory.mktemp("fixtures")
    generator = load_fixture_module()
    for name in generator.FIXTURES:
        (out / f"{name}.onnx").write_bytes(generator.build(name).SerializeToString(deterministic=True))
    return out
