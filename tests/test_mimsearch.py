"""The application package: `make demo` end to end in its --quick form (a small catalog, a few training steps,
a real tritonserver), and the `mimsearch` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mim.commandline import CommandParser
from mimsearch import cli, demo


@pytest.mark.server
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    art = tmp_path / "artifacts"
    assert demo.main(["--artifacts", str(art), "--quick", "--steps", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    headers = re.findall(r"^==> \[(\d)/8\] (\w+):", out, flags=re.M)
    assert [h[1] for h in headers] == ["catalog", "train", "export", "serve", "index", "search", "quality", "page"]
    # The served-vs-in-process line, with numbers in [0, 1].
    m = re.search(r"served image Recall@1 ([\d.]+) / Recall@10 ([\d.]+) vs in-process torch ([\d.]+) / ([\d.]+)", out)
    assert m, out[-3000:]
    # One search of each kind also ran in one request through the search_* ensembles, with the same ids.
    for model in ("search_image", "search_text", "search_multimodal"):
        assert f"server-side ({model}, one request)" in out
    assert out.count("same ids over the top") == 3 and "DIFFERENT ids" not in out
    served_r1, served_r10, local_r1, local_r10 = map(float, m.groups())
    assert 0 <= served_r1 <= served_r10 <= 1 and 0 <= local_r1 <= local_r10 <= 1
    # The served ONNX path and torch compute the same embeddings, so the recalls agree.
    assert abs(served_r10 - local_r10) <= 0.05
    assert re.search(r"^\s+mm-refine R@10\s+[\d.]+\s+[\d.]+$", out, flags=re.M)
    page = (art / "results.html").read_text()
    assert page.count('<li class="result') >= 6 and "data:image/png;base64," in page
    # DML and 3-tower side by side on the same street photos, other-category results counted per model.
    assert page.count('<section class="query-block comparison">') == 4
    assert page.count('data-model="DML (image only)"') == page.count('data-model="3-tower"') == 4
    assert len(re.findall(r"another category in the top 10: DML \(image only\) \d+, 3-tower \d+", out)) == 4
    # The page explains itself: an intro, the metrics table, the model in words, expected products, a caption.
    assert "What this page shows" in page and "Retrieval quality on the whole test split" in page
    assert re.search(r"<td>image R@1</td><td>[\d.]+</td><td>[\d.]+</td>", page)
    assert re.search(r"model: 3tower trained here for 4 steps on the synthetic catalog \(.*\), id [0-9a-f]{16}", page)
    assert page.count('<div class="expected">expected product: ') == 6  # every search block
    assert page.count("<p>Counted below: results of another category") == 1  # the comparison's caption
    assert re.search(r"95% paired bootstrap interval [+-][\d.]+ to [+-][\d.]+\) after 4 training steps: the", page)
    assert "street/q" not in page.split("<body>")[1].split("<img")[0]  # headings are words, not file paths
    assert (art / "index" / "test.safetensors").is_file() and "server stopped" in out


# --- the `mimsearch` command ---------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def test_console_script_is_declared_in_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"mimsearch": "mimsearch.cli:main"}


def test_every_subcommand_delegates_to_a_module_main():
    for name, cmd in cli.SUBCOMMANDS.items():
        assert importlib.util.find_spec(cmd.module) is not None, name
        source = Path(importlib.util.find_spec(cmd.module).origin).read_text()
        assert "def main(argv" in source, cmd.module


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("catalog", "train", "evaluate", "compare", "engines", "serve", "repository", "index", "search"):
        assert re.search(rf"^\s+{name}\s+\S", out, flags=re.M), name
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_a_subcommand_runs_the_module_main(capsys):
    # `mimsearch repository --check` is `mimsearch repository --check` on the committed tree.
    assert cli.main(["repository", "--check"]) == 0
    assert "is up to date" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["engines", "--help"])
    assert "--checkpoint" in capsys.readouterr().out  # the subcommand's own flags


@pytest.mark.parametrize("how", ["console script", "python -m mimsearch"])
def test_the_real_command_runs(how):
    script = Path(sys.executable).parent / "mimsearch"
    if how == "console script" and not script.is_file():
        pytest.skip(f"no console script at {script}: the virtualenv predates [project.scripts]; pip install -e .")
    head = [str(script)] if how == "console script" else [sys.executable, "-m", "mimsearch"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*head, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and "engines" in done.stdout, done.stderr
    done = subprocess.run([*head, "repository", "--check"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "is up to date" in done.stdout, done.stderr


# --- help ------------------------------------------------------------------------------------------------------
def command_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `mimsearch NAME --help` prints: caught as it prints, so commands that build theirs inside
    main() are read too."""
    seen = []
    monkeypatch.setattr(CommandParser, "print_help", lambda self, file=None: seen.append(self))
    cmd = cli.SUBCOMMANDS[name]
    with pytest.raises(SystemExit):
        importlib.import_module(cmd.module).main([*cmd.prefix, "--help"])
    return seen[0]


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_every_command_and_flag_is_described(name, monkeypatch):
    parser = command_parser(name, monkeypatch)
    assert parser.prog == f"mimsearch {name}"  # one program name in every usage line
    assert (parser.description or "").strip(), f"mimsearch {name} has no description"
    undescribed = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert undescribed == [], f"mimsearch {name}: flags without help {undescribed}"
    formatter = parser._get_formatter()  # what --help prints for each flag
    silent = [
        a.option_strings
        for a in parser._actions
        if a.option_strings
        and a.default not in (None, False, [], argparse.SUPPRESS)
        and "default" not in formatter._get_help_string(a)
    ]
    assert silent == [], f"mimsearch {name}: defaults not shown for {silent}"


def _readme_commands() -> list[tuple[str, list[str]]]:
    """(subcommand, flags) of every `mimsearch NAME ...` command line in the README's code blocks."""
    text = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ")
    found = []
    for line in blocks.splitlines():
        for m in re.finditer(r"mimsearch (\S+)([^&#|]*)", line):
            found.append((m.group(1), re.findall(r"(?<!\S)(--?[a-z][\w-]*)", m.group(2))))
    return found


def test_readme_lists_every_command_and_uses_only_real_flags(monkeypatch):
    text = (ROOT / "README.md").read_text()
    table_text = text.split("| command | what it does |", 1)[1].split("\n\n", 1)[0]
    table = set(re.findall(r"^\| `([a-z-]+)` \|", table_text, flags=re.M))
    assert table == set(cli.SUBCOMMANDS), f"README command table differs: {table ^ set(cli.SUBCOMMANDS)}"
    used = _readme_commands()
    assert len(used) > 10  # the walk found the quick start
    for name, flags in used:
        assert name in cli.SUBCOMMANDS, f"README runs `mimsearch {name}`, which does not exist"
        known = {o for a in command_parser(name, monkeypatch)._actions for o in a.option_strings}
        assert set(flags) <= known, f"README: `mimsearch {name}` with unknown flags {set(flags) - known}"
