"""Untrusted files and recipes, round two (issue 34): each test is one hole closed, reproduced first.

Real inputs throughout: real pickles, a real offline Hugging Face cache, a real local socket server,
real symlinks. Each test names the finding it closes.
"""

import os

import pytest

from conftest import tiny_overrides


def one_line_error(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- 1: a pipe: hidden in braces


@pytest.mark.parametrize("where", ["validate", "dry-run", "pretrain", "mixture", "inspect"])
def test_a_pipe_command_hidden_in_braces_is_refused_and_never_runs(tmp_path, cli, monkeypatch, where):
    monkeypatch.chdir(tmp_path)  # where `touch PWNED` lands if it runs
    hidden = f"{{pipe:touch PWNED,{tmp_path}/00000.tar}}"
    train = f"{tmp_path}/a.tar@0.7::{hidden}@0.3" if where == "mixture" else hidden
    argv = {"validate": ["validate", "tiny/pretrain", f"data.train={train}"],
            "mixture": ["validate", "tiny/pretrain", f"data.train={train}"],
            "dry-run": ["pretrain", "tiny/pretrain", f"data.train={train}", "--dry-run", "--out", tmp_path / "r"],
            "pretrain": ["pretrain", "tiny/pretrain", *tiny_overrides(), f"data.train={train}", "--out", tmp_path / "r"],
            "inspect": ["data", "inspect", train, "--sheet-count", "0"]}[where]
    key = "PATH" if where == "inspect" else "data.train"
    one_line_error(cli(*argv), f"{key}: ", 'expands to "pipe:touch PWNED"', "write the scheme before the braces")
    assert not (tmp_path / "PWNED").exists()


def test_inspect_announces_the_commands_it_runs(tmp_path, cli):
    result = cli("data", "inspect", "pipe:cat /nonexistent/{0..1}.tar", "--sheet-count", "0")
    assert result.stdout.splitlines()[0].startswith("PATH runs: sh -c 'cat /nonexistent/{0..1}.tar'"), result.stdout


def test_control_characters_in_an_announced_command_are_shown_escaped(cli):
    """An ESC sequence plus a carriage return would erase the announced line on a terminal."""
    result = cli("validate", "tiny/pretrain", "data.train=pipe:cat x.tar; touch PWNED\x1b[2K\r/data/{0..1}.tar")
    assert result.returncode == 0, result.stderr
    announced = [line for line in result.stdout.splitlines() if line.startswith("data.train runs:")]
    assert len(announced) == 1 and "touch PWNED\\x1b[2K\\r/data/" in announced[0], result.stdout
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    bad = cli("validate", "tiny/pretrain", "data.train=gs://b\x1b[2K/x.tar")
    assert "\x1b" not in bad.stderr and "\\x1b" in one_line_error(bad, "data.train")
