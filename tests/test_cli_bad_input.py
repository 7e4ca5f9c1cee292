"""Every command refuses bad input with one clear message and a non-zero exit, before doing
any work: never a Python traceback, never a run that quietly does something else."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from frugalserve.cli import app

# (arguments, words the message must hold); {tmp} is a fresh folder, {db} a SQLite URL in it
CASES = [
    (["serve", "{tmp}/nonexistent"], "not a directory"),
    (["serve", "{tmp}/models", "--port", "70000"], "outside 0-65535"),
    (["serve", "{tmp}/models", "--ledger", "mysql://x/y"], "cannot open it"),
    (["serve", "{tmp}/models", "--log-level", "nosuch"], "--log-level"),
    (["serve", "{tmp}/models", "--max-body-mb", "nan"], "--max-body-mb"),
    (["serve", "{tmp}/models", "--poll-interval", "-1"], "poll"),
    (["serve", "{tmp}/models", "--flush-interval", "0"], "flush interval must be positive"),
    (["serve", "{tmp}/models", "--flush-interval", "inf"], "flush interval must be positive"),
    (["ledger", "prune", "--days", "0", "--ledger", "{db}"], "positive number of days"),
    (["ledger", "prune", "--days", "nan", "--ledger", "{db}"], "positive number of days"),
    (["budgets", "alerts", "--limit", "0", "--ledger", "{db}"], "at least 1"),
    (["keys", "create", "--tenant", "t", "--tier", "gold", "--ledger", "{db}"], "tier 'gold'"),
    (["report", "--ledger", "{tmp}/l.db"], "sqlite:///"),
    (["report", "--ledger", "{db}", "-f", "csv", "-o", "/proc/no/such.csv"], "cannot write"),
    (["optimize", "nomodel", "--repository", "{tmp}/models", "--data", "fashion-mnist"],
     "no such model folder"),
    (["workloads", "build", "--repository", "{tmp}/a-file", "--only", "movielens"],
     "cannot create it"),
    (["workloads", "build", "--repository", "{tmp}/models", "--only", "nosuch"], "nosuch"),
    (["demo", "--duration", "0", "--workdir", "{tmp}/demo"], "duration"),
    (["bench", "ftp://example.invalid", "-m", "x"], "ftp://"),
]


@pytest.mark.parametrize(("args", "words"), CASES, ids=[" ".join(c[0][:2]) + f" {i}"
                                                         for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_message(tmp_path: Path, args: list[str], words: str) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.format(tmp=tmp_path, db=f"sqlite:///{tmp_path / 'l.db'}") for a in args]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a crash
    assert "Traceback" not in result.output
    text = " ".join(result.output.split()).replace("│ ", "")
    assert words in text, text


def test_serve_flush_interval_defaults_to_the_ledgers() -> None:
    # the CLI states its default for --help without importing the ledger (SQLAlchemy) at start
    import inspect

    from frugalserve.cli import serve
    from frugalserve.economics.ledger import FLUSH_INTERVAL_S

    assert inspect.signature(serve).parameters["flush_interval"].default.default == \
        FLUSH_INTERVAL_S
