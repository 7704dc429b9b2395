"""The Markdown table of every run argument (name, section, default, meaning) in README.md.

``python tools/argument_table.py`` prints it; ``--write`` replaces the table between the markers in
README.md. A test checks that the README's table matches the dataclasses.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prm.config import SECTIONS  # noqa: E402


def argument_table() -> str:
    rows = ["| argument | section | default | meaning |", "|---|---|---|---|"]
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            help_text = field.metadata["help"].replace("|", "\\|")
            rows.append(f"| `{field.name}` | {section} | `{default!r}` | {help_text} |")
    return "\n".join(rows)


README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- arguments:start -->", "<!-- arguments:end -->"


def readme_table(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        text = README.read_text()
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        README.write_text(f"{before}{START}\n{argument_table()}\n{END}{after}")
    else:
        print(argument_table())
