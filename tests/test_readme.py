"""Every Python code block of README.md runs, in order, in one namespace (as a reader would)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples() -> None:
    assert len(python_blocks()) >= 5


def test_readme_python_blocks_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md block {index}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"README.md python block {index} failed: {error!r}\n{block}") from error


def test_readme_names_the_test_command() -> None:
    text = README.read_text()
    assert "python -m pytest -q tests" in text
    assert "pytest -q tests" in (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
