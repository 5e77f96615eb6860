"""The README's example runs, CI runs the README's install block and test command, a clean clone
collects the suite, and the CLI dispatches."""

import re
import shlex
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


def _readme_block(name):
    """The lines of the README's fenced block between <!-- name --> and <!-- /name -->."""
    block = re.search(rf"<!-- {name} -->\n```bash\n(.*?)\n```\n<!-- /{name} -->", README, flags=re.S)
    assert block, f"README has no <!-- {name} --> block"
    return block.group(1)


def _ci_function(name):
    """A shell function's definition, as written in .ci/run."""
    ci = (ROOT / ".ci" / "run").read_text()
    definition = re.search(rf"^{name}\(\) \{{.*?^\}}$", ci, flags=re.S | re.M)
    assert definition, f".ci/run defines no {name}()"
    return definition.group(0)


def test_ci_runs_the_readme_install_block_and_test_command():
    install, test_command = _readme_block("install"), _readme_block("test-command")
    assert re.search(r'^pip install -e "\.\[(?=[^\]]*triton)(?=[^\]]*train)(?=[^\]]*dev)[^\]]*\]"$', install, re.M), (
        "the install block must install the triton, train and dev extras")
    assert test_command.startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'eval "$install_block"' in ci and "readme_block test-command" in ci
    # .ci/run's own extraction yields exactly the README's lines.
    for name, lines in (("install", install), ("test-command", test_command)):
        extracted = subprocess.run(["bash", "-c", f"{_ci_function('readme_block')}\nreadme_block {name}"],
                                   cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert extracted.rstrip("\n") == lines
    assert "-eq 5" in _ci_function("run_pytest")  # pytest's "no tests collected" fails every stage


def test_ci_tests_the_lower_bound_of_the_triton_range():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["triton"]
    lower = re.fullmatch(r"triton>=([0-9.]+),<[0-9.]+", extra[0]).group(1)
    line = next(l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.startswith("OLDEST_TRITON="))
    oldest = subprocess.run(["bash", "-c", f"{line}\necho $OLDEST_TRITON"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert oldest == lower


@pytest.mark.slow
def test_a_clone_without_shared_collects_the_readme_test_command(tmp_path):
    """The repository stands alone: a clone of the committed tree, with no ../shared beside it,
    collects every test of the README's test command (a data file that the tests read at import
    time but that is not committed, or that lives outside the repository, fails here)."""
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout: nothing to clone")
    clone = tmp_path / "fused-canon"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    assert not (tmp_path / "shared").exists()
    command = shlex.split(_readme_block("test-command"))
    assert command[:3] == ["python", "-m", "pytest"]
    collect = subprocess.run([sys.executable, *command[1:], "--collect-only", "-p", "no:cacheprovider"], cwd=clone,
                             capture_output=True, text=True, timeout=600)
    assert collect.returncode == 0, f"collection in a clean clone failed:\n{collect.stdout[-4000:]}\n{collect.stderr[-4000:]}"
    assert re.search(r"\b\d+ tests? collected|\[\d+ items?\]", collect.stdout), collect.stdout[-2000:]


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
