"""A plain `pip install .` (the README's first command) installs every package of the tree: CI
installs in editable mode, which finds packages pyproject.toml forgot."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

# Where each installed package's sources are (pyproject.toml's package-dir).
SOURCES = {"graphpass": REPO_ROOT / "graphpass", "graphpass.passes": REPO_ROOT / "passes"}


def test_pyproject_lists_every_package_of_the_tree():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*?)\]", pyproject, re.M).group(1)))
    in_tree = set()
    for package, folder in SOURCES.items():
        for init in folder.rglob("__init__.py"):
            in_tree.add(".".join((package, *init.parent.relative_to(folder).parts)))
    missing, absent = sorted(in_tree - listed), sorted(listed - in_tree)
    assert in_tree == listed, f"not installed: {missing}; listed but absent: {absent}"
