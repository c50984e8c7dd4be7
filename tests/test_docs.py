"""The README must match the code it documents."""

from __future__ import annotations

import re

from click.testing import CliRunner

from conftest import REPO_ROOT
from graphpass.cli import main


def test_readme_pass_list_matches_the_registry():
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- passes:begin.*?-->\n```\n(.*?)```\n<!-- passes:end -->", readme, re.S)
    assert block, "README lost its generated passes block"
    assert block.group(1) == CliRunner().invoke(main, ["passes"]).output


def test_readme_commands_match_ci():
    readme = (REPO_ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme)
    assert len(commands) == 2
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci
    assert commands[0].startswith("pip install . && graphpass run fixtures/example.onnx")
