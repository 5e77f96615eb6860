"""The README's example runs, CI runs the README's test command, and the CLI dispatches."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401 - the README example uses it

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
        assert namespace["logits"].grad is not None and namespace["logits"].grad.isfinite().all()


def test_ci_runs_the_readme_test_command():
    command = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```\n<!-- /test-command -->", README, flags=re.S)
    assert command and command.group(1).startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and 'eval "$test_command"' in ci
    assert "-eq 5" in ci  # pytest's "no tests collected" fails CI


def test_cli_usage_and_unknown_subcommand():
    run = lambda *args: subprocess.run([sys.executable, "-m", "fused_canon.cli", *args],  # noqa: E731
                                       capture_output=True, text=True)
    usage = run("--help")
    assert usage.returncode == 0 and "train" in usage.stdout
    assert run().returncode == 2
    unknown = run("fly")
    assert unknown.returncode == 2 and "unknown subcommand 'fly'" in unknown.stderr


@pytest.mark.parametrize("package", ["fused_canon.kernels", "fused_canon.trainer", "fused_canon.bench"])
def test_subpackages_install_inside_the_namespace(package):
    module = __import__(package, fromlist=["_"])
    assert Path(module.__file__).parent.name in {"kernels", "trainer", "bench"}
