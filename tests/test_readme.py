"""The README's commands and code stay true: its Python example runs, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    test_command = README.split("Run the tests:")[1].strip().splitlines()[0].strip()
    assert test_command.endswith("python -m pytest -q")
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_main_job_is_the_demo_command():
    main_job = README.split("Run the tests:")[0]
    assert "monai-unireg demo --out demo" in main_job  # executed end to end by tests/test_cli.py
