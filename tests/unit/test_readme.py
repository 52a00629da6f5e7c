"""The README is part of the interface: its configuration table and commands must match the code."""

from __future__ import annotations

import re

from streams.cli import build_parser
from streams.settings import Settings

from ..harness import REPO

README = (REPO / "README.md").read_text()


def test_configuration_table_is_the_settings_object() -> None:
    start = README.index("<!-- settings-table -->") + len("<!-- settings-table -->")
    end = README.index("<!-- /settings-table -->")
    assert README[start:end].strip() == Settings.markdown_table(), \
        "regenerate: python -c 'from streams.settings import Settings; print(Settings.markdown_table())'"


def test_every_profilestream_command_in_the_readme_parses() -> None:
    parser = build_parser()
    commands = re.findall(r"^profilestream ([^\n#]+)", README, flags=re.M)
    assert len(commands) >= 10
    for line in commands:
        argv = line.replace("\\", "").split()
        parser.parse_args(argv)  # exits (fails the test) on an unknown command or option


def test_the_two_setup_commands_are_the_makefile_targets() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "make demo" in README and "make test" in README
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()
