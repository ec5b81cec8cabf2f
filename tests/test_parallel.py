"""The suite's own parallel set-up (tests/conftest.py): tests that share a module's trained project run on
one xdist worker, so it is made once."""

import pytest


def test_tests_sharing_a_module_fixture_are_grouped_onto_one_worker(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not an xdist worker with --dist loadgroup (e.g. -n 0): nothing is distributed")
    grouped = [item for item in request.session.items if item.get_closest_marker("xdist_group")]
    assert grouped, "tests/conftest.py marked no test: the modules with module-scoped fixtures are not grouped"
    # pytest-xdist sends a group to one worker by the "@group" it appends to each node id; pytest 9.2
    # made it ignore the mark silently (pytest-dev/pytest-xdist#1386): install requirements.lock's versions.
    ignored = [item.nodeid for item in grouped if not item.nodeid.endswith(f"@{item.module.__name__}")]
    assert not ignored, f"pytest-xdist ignored the xdist_group of {len(ignored)} tests, e.g. {ignored[:3]}"


def test_the_longest_tests_are_sent_first(request):
    """End-to-end tests, then slow ones, then the rest: a long group that started last would run alone at the end
    while the other workers idle (pytest-xdist's own reordering by group size is off: pyproject.toml)."""
    kinds = [0 if item.get_closest_marker("e2e") else 1 if item.get_closest_marker("slow") else 2
             for item in request.session.items]
    assert kinds == sorted(kinds)
    assert request.config.getoption("loadscopereorder", default=False) is False
