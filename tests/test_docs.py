"""The documentation cannot rot: every `gradlm ...` command line in the README and the site's pages parses with the
real parser (a renamed or removed flag fails here), every relative link points at a file that exists, and the
course's scripts run at tiny sizes and draw their pictures (`make docs-figures` runs them at full size)."""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from gradlm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SCRIPTS = sorted((ROOT / "docs" / "course").glob("[0-9]*.py"))
COMMANDS = set(next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices)


def command_lines(text: str) -> list[str]:
    """The arguments of each `gradlm ...` line of the shell blocks of a page (comments, redirections and pipes cut
    off; a line continued with a backslash joined; lines with a `...` placeholder left out)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.match(r"^\s*(?:\$ )?(?:torchrun .*? -m )?gradlm (.*)$", line)
            if not m or "..." in line:
                continue
            args = re.split(r"\s+#\s", m.group(1))[0]
            args = re.split(r"\s[>|]\s?", args)[0]
            out.append(args)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(page):
    parser = build_parser()
    lines = command_lines(page.read_text(encoding="utf-8"))
    wrong = []
    for args in lines:
        try:
            parser.parse_args(shlex.split(args))
        except SystemExit:
            wrong.append(args)
    assert not wrong, f"{page.name}: these commands no longer parse: {wrong}"


def test_the_pages_show_commands_at_all():
    """The check above sees the commands (it is not vacuously true)."""
    assert len(command_lines((ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8"))) >= 10
    assert command_lines("```bash\ngradlm train --out x  # why\ngradlm eval r > out.txt\n```\n") == [
        "train --out x",
        "eval r",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://|^#|^mailto:", target):
            continue
        path = target.split("#")[0]
        if path.startswith("commands/"):  # written at build time from the parser (docs/hooks.py)
            if Path(path).stem not in {"index", *COMMANDS}:
                missing.append(target)
        elif not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_course_scripts_run_and_draw(script, tmp_path, monkeypatch, capsys):
    """Each chapter as `python docs/course/NN_name.py --tiny` runs it, in this process (no second torch import)."""
    monkeypatch.syspath_prepend(str(script.parent))  # its `_common`
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny", "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    assert list(tmp_path.glob("*.png")), f"{script.name} drew nothing"
    assert "check:" in capsys.readouterr().out  # each chapter prints the numbers its "Test me" asks the reader to read
