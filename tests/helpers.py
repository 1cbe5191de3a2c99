"""Helpers shared by test files (tests/ is on sys.path: pytest puts a test file's folder there)."""

from lcsm.cli import main


def cli_error(args, capsys) -> str:
    """Run `lcsm ARGS`, expect exit code 2 with a message and no traceback; return stderr."""
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err
    return captured.err
