"""The recipes of docs/integrations.md run exactly as written (the code block after each
``<!-- run: NAME -->`` marker)."""

import re
from pathlib import Path

from peers import require

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def recipe(name: str) -> str:
    match = re.search(rf"<!-- run: {name} -->\n```python\n(.*?)\n```", DOC.read_text(), re.S)
    assert match, f"docs/integrations.md has no recipe marked <!-- run: {name} -->"
    return match.group(1)


def test_plain_pytorch_recipe_runs(capsys):
    exec(compile(recipe("plain"), f"{DOC}:plain", "exec"), {"__name__": "__recipe__"})
    assert capsys.readouterr().out.strip()


def test_trl_recipe_runs(capsys):
    require("trl")
    exec(compile(recipe("trl"), f"{DOC}:trl", "exec"), {"__name__": "__recipe__"})
    float(capsys.readouterr().out.strip().splitlines()[-1])  # the logged actor/pg_loss
