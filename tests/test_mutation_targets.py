"""The mutation check's targets (tests/mutation/run_mutations.py) still exist in the package.

The mutation run itself is slow and not part of the suite; this fast test fails as soon as a refactor removes or
duplicates a target string, so that the list is updated with the code.
"""

import sys
from pathlib import Path

import vector_quantize_pytorch

sys.path.insert(0, str(Path(__file__).parent / "mutation"))

import run_mutations  # noqa: E402


def test_every_mutation_target_is_in_exactly_one_file_of_the_package():
    package_dir = Path(vector_quantize_pytorch.__file__).parent
    assert run_mutations.missing_targets(package_dir) == []


def test_the_mutations_are_many_distinct_and_each_names_tests():
    names = [mutation.name for mutation in run_mutations.MUTATIONS]
    assert len(names) >= 12 and len(set(names)) == len(names)
    for mutation in run_mutations.MUTATIONS:
        assert mutation.old != mutation.new and mutation.tests, mutation.name
        for test in mutation.tests:
            assert (run_mutations.REPO_ROOT / test.split("::")[0]).is_file(), (mutation.name, test)
