"""The README's two opening commands are the ones CI and newcomers run."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("python3 -m venv .venv")]


def test_readme_opens_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    run_main, run_tests = _commands(first_block)
    assert "python -m graphgrpo_jax.main --config=configs/relevance.py:cpu" in run_main
    assert "python -m pytest" in run_tests


def test_ci_runs_the_readme_test_command():
    readme_test_command = _commands((REPO / "README.md").read_text())[1]
    assert readme_test_command in _commands((REPO / ".ci" / "run").read_text())
