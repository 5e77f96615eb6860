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
    """The repository stands alone: a clone of the committed tree, with no shared folder beside it,
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


# Every "§" a file cites must be a heading of a document in the repository ---------------------

DOCS = {"algorithms": ROOT / "docs" / "algorithms.md", "design": ROOT / "docs" / "design.md"}
SECTION_HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)[. ]", flags=re.M)
# A document's name and the run of sections after it: "docs/algorithms.md §1.1-1.3, §2.3 and §3".
DOC_REFERENCE = re.compile(
    r"\b(algorithms|design)\.md[\s(]*(§\s*\d[\d.]*(?:(?:\s*[-–,/]\s*|\s+and\s+)§?\s*\d[\d.]*)*)")
SECTION_NUMBER = re.compile(r"\d+(?:\.\d+)*")
BARE_SECTION = re.compile(r"(?<![\w.])§\s*(\d+(?:\.\d+)*)")
# The specs the project was started from live outside the repository: no file may send a reader there.
OUTSIDE = re.compile(
    r"\b(?:ALGORITHMS|DESIGN|PEERS|ENVIRONMENT|TRAINERS)(?:\.md\b| §)|\.\./shared|\bshared/(?:golden|spec)\b")


def _tracked(*patterns):
    listed = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in listed.stdout.split()]


def _sections(doc):
    return set(SECTION_HEADING.findall(doc.read_text()))


def _cited(text, doc_names):
    """(doc, section) pairs: each "<doc>.md §n" run, and each other "§n" with the docs the text names."""
    explicit = [(m.group(1), n) for m in DOC_REFERENCE.finditer(text) for n in SECTION_NUMBER.findall(m.group(2))]
    bare = [(tuple(doc_names), n) for n in BARE_SECTION.findall(DOC_REFERENCE.sub(" ", text))]
    return explicit, bare


@pytest.mark.parametrize("path", _tracked("*.py", "*.md"), ids=lambda p: str(p.relative_to(ROOT)))
def test_section_references_exist(path):
    sections = {name: _sections(doc) for name, doc in DOCS.items()}
    text = path.read_text()
    if path.parent == ROOT / "docs" and path.stem in DOCS:
        named = [path.stem]  # a document's bare "§n" is its own section
    else:
        named = [name for name in DOCS if re.search(rf"\b{name}\.md\b", text)]
    explicit, bare = _cited(text, named)
    missing = [f"{doc}.md §{n}" for doc, n in explicit if n.rstrip(".") not in sections[doc]]
    missing += [f"§{n} (this file names: {', '.join(docs) or 'no document'})"
                for docs, n in bare if not any(n.rstrip(".") in sections[doc] for doc in docs)]
    assert not missing, f"{path.relative_to(ROOT)} cites sections that no heading of docs/ has: {missing}"


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in _tracked():
        data = path.read_bytes() if path.is_file() else b"\0"
        if b"\0" in data:
            continue  # binary (the README's plot)
        offenders += [f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}"
                      for i, line in enumerate(data.decode(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not offenders, "the repository must stand on its own; these lines cite files outside it:\n" + \
        "\n".join(offenders)


def test_reference_checks_catch_what_they_should():
    sign = "\u00a7"  # spelled out, so that this file's own scan does not see these examples
    text = f"see docs/algorithms.md {sign}8.3, {sign}99 and {sign}1.1-1.3; also {sign}42"
    explicit, bare = _cited(text, ["algorithms"])
    assert explicit == [("algorithms", "8.3"), ("algorithms", "99"), ("algorithms", "1.1"), ("algorithms", "1.3")]
    assert bare == [(("algorithms",), "42")]
    assert "8.3" in _sections(DOCS["algorithms"]) and "99" not in _sections(DOCS["algorithms"])
    spec, shared = "ALGORITHMS" + ".md", ".." + "/shared"
    assert OUTSIDE.search(f"{spec} {sign}8.3") and OUTSIDE.search(f"{shared}/golden/x.json")
    assert not OUTSIDE.search("PEERS = probe_peers()") and not OUTSIDE.search(f"docs/design.md {sign}4")
