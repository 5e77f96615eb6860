"""Every upstream golden case (verl 0.9.1, CANON, QAE) through the public API in fp64: rel. error <= 1e-9."""

import pytest

from golden import load_cases, run_case
from helpers import relative_error

CASES = load_cases()


def _case_id(index_case):
    index, case = index_case
    detail = "-".join(str(v) for v in case["config"].values() if v is not None)
    return f"{index}-{case['kind']}-{detail}"


def test_golden_file_has_every_kind():
    kinds = {case["kind"] for case in CASES}
    assert kinds == {"advantage", "token_stats", "policy_loss", "kl"}
    assert len(CASES) == 224


@pytest.mark.parametrize("index_case", list(enumerate(CASES)), ids=_case_id)
def test_golden_case_torch_fp64(index_case):
    _, case = index_case
    for name, (actual, expected) in run_case(case, backend="torch").items():
        error = relative_error(actual, expected)
        assert error <= 1e-9, f"{name}: relative error {error:.3e} ({case['source']})"
