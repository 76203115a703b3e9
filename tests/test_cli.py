"""The `uniguard` command: every subcommand has useful help, and --help stays light (no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from uniguard.cli import build_parser

SUBCOMMANDS = {
    ("serve",): ["--host", "--port", "--model", "UNIGUARD_"],
    ("bench",): ["--model", "--engine"],
    ("eval",): ["--model", "--data", "--json", "--policies"],
    ("train", "taskguard"): ["--policy", "--base", "--max-minutes"],
    ("train", "multitask"): ["--mlm-weight", "--adv-weight", "--holdout"],
    ("merge", "search"): ["--candidates", "--iterations", "--top-k", "--strategy"],
    ("merge", "apply"): ["--candidates", "--method", "--weights"],
    ("export",): ["--model", "--target", "--out", "cpu-int8", "cuda-fp16"],
    ("synth",): ["--policy", "--endpoint", "--model", "--n"],
}


@pytest.mark.parametrize("words", list(SUBCOMMANDS), ids=lambda w: " ".join(w))
def test_subcommand_help_names_its_options(words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in SUBCOMMANDS[words]:
        assert option in out, f"`uniguard {' '.join(words)} --help` does not mention {option}"


def test_top_level_help_lists_every_command_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from uniguard.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'uniguard --help imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "bench", "eval", "train", "synth", "merge", "export"):
        assert command in result.stdout
