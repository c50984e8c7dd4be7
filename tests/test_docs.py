"""The README must match the code it documents."""

from __future__ import annotations

import re
import shlex

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


def test_readme_example_command_does_what_the_readme_shows(tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    install_and_run = re.findall(r"```sh\n(.*?)\n```", readme)[0]
    args = shlex.split(install_and_run.split("&&", 1)[1])[1:]  # drop `graphpass`
    args = [str(REPO_ROOT / a) if a.startswith("fixtures/") else a for a in args]
    args[args.index("-o") + 1] = str(tmp_path / "example.small.onnx")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    shown = re.search(r"file size .*\((\d+\.\d)% of the input\)", readme).group(1)
    ran = re.search(r"file size .*\((\d+\.\d)% of the input\)", result.output).group(1)
    assert ran == shown
