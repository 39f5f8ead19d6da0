"""The marker plugin: a test without exactly one kind is refused at collection, and a selection that left a
test out fails the run when `make test` asks it to."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit

pytest_plugins = ["pytester"]

MARKERS_INI = """
[pytest]
markers =
    unit: u
    integration: i
    e2e: e
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(MARKERS_INI)
    return pytester


def test_a_test_without_a_kind_is_refused_at_collection_and_named(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_mixed="""
        import pytest

        @pytest.mark.unit
        def test_marked(): pass

        def test_forgotten(): pass
        """
    )
    result = suite.runpytest("-p", "tests.support.markers", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_mixed.py::test_forgotten carries none; it needs exactly one of the markers*"])
    assert "test_marked carries" not in result.stderr.str()


def test_a_test_with_two_kinds_is_refused(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_two="""
        import pytest

        @pytest.mark.unit
        @pytest.mark.e2e
        def test_both(): pass
        """
    )
    result = suite.runpytest("-p", "tests.support.markers", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_both carries unit, e2e*"])


@pytest.mark.parametrize(
    ("flag", "expected"), [([], pytest.ExitCode.OK), (["--fail-on-deselected"], pytest.ExitCode.USAGE_ERROR)]
)
def test_a_deselected_test_fails_the_run_only_when_asked(
    suite: pytest.Pytester, flag: list[str], expected: pytest.ExitCode
) -> None:
    suite.makepyfile(
        test_kinds="""
        import pytest

        @pytest.mark.unit
        def test_unit(): pass

        @pytest.mark.integration
        def test_integration(): pass
        """
    )
    result = suite.runpytest("-p", "tests.support.markers", "-m", "unit", *flag)
    assert result.ret == expected
    result.assert_outcomes(passed=1, deselected=1)


def test_every_kind_present_and_nothing_deselected_passes(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_unit="""
        import pytest

        pytestmark = pytest.mark.unit

        def test_one(): pass
        def test_two(): pass
        """
    )
    result = suite.runpytest("-p", "tests.support.markers", "-m", "unit", "--fail-on-deselected")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=2)
