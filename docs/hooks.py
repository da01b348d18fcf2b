"""mkdocs hooks: one page per `gradlm` command, written at build time from the parser `--help` uses, so the
pages cannot drift from the command."""

from __future__ import annotations

import argparse

from mkdocs.structure.files import File


def _commands() -> dict[str, argparse.ArgumentParser]:
    from gradlm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _page(name: str, p: argparse.ArgumentParser, summary: str) -> str:
    p.prog = f"gradlm {name}"
    return f"# gradlm {name}\n\n{summary}\n\n```text\n{p.format_help()}```\n"


def on_files(files, config):
    """Add commands/index.md and commands/NAME.md for every command."""
    from gradlm.cli import build_parser

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    rows = ["# Commands", "", "Every command, with the flags `gradlm COMMAND --help` prints.", ""]
    rows += ["| command | what it does |", "|---|---|"]
    for name, p in sub.choices.items():
        rows.append(f"| [`gradlm {name}`]({name}.md) | {helps.get(name, '')} |")
        files.append(File.generated(config, f"commands/{name}.md", content=_page(name, p, helps.get(name, ""))))
    files.append(File.generated(config, "commands/index.md", content="\n".join(rows) + "\n"))
    return files
