"""The docs cannot drift from the code and the generated reports: every test they cite exists, and the
figures of the current profile are the benchmarks' tables, not copies typed into prose."""

import ast
import re
from pathlib import Path

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TESTS = REPO / "tests"
# A cited test: `tests/test_x.py`, `tests/test_x.py::name` (`name[param]` too), or `::name` for another test
# of the file cited last, or a bare `test_name`.
CITATION = re.compile(r"tests/(?P<file>test_\w+)\.py(?:::(?P<name>\w+))?|::(?P<same_file>\w+)|\b(?P<bare>test_\w+)\b")
# A block a benchmark writes into a page (README's results table, docs/performance.md's table)
GENERATED = re.compile(r"<!-- (\S+): made by .*?-->.*?<!-- /\1 -->", re.DOTALL)
MEAN_AND_SPREAD = re.compile(r"\d\.\d+ ± \d\.\d+")


def defined_names(file: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(file.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


def missing_citations(text: str, test_files: dict[str, set[str]]) -> list[str]:
    """The tests `text` cites that `test_files` ({file stem: names defined in it}) lack."""
    everywhere = set(test_files).union(*test_files.values())
    missing, last_file = [], None
    for match in CITATION.finditer(text):
        if match["file"]:
            last_file = match["file"]
            if last_file not in test_files:
                missing.append(f"tests/{last_file}.py")
            elif match["name"] and match["name"] not in test_files[last_file]:
                missing.append(f"tests/{last_file}.py::{match['name']}")
        elif match["same_file"]:
            if last_file in test_files and match["same_file"] not in test_files[last_file]:
                missing.append(f"tests/{last_file}.py::{match['same_file']}")
        elif match["bare"] not in everywhere:
            missing.append(match["bare"])
    return missing


def test_every_test_the_docs_cite_exists():
    test_files = {file.stem: defined_names(file) for file in TESTS.glob("test_*.py")}
    missing = {page.relative_to(REPO).as_posix(): found for page in PAGES
               if (found := missing_citations(page.read_text(), test_files))}
    assert not missing, f"the docs cite tests that do not exist (renamed or removed?): {missing}"


def test_the_citation_check_finds_a_renamed_test():
    files = {"test_config": {"test_bad_params_are_refused", "test_other"}}
    text = ("`tests/test_config.py::test_bad_params_are_refused`, `::test_old_name`; `tests/test_gone.py`; "
            "`test_other` and `test_never_was`; `tests/test_config.py::test_renamed[case]`")
    assert missing_citations(text, files) == ["tests/test_config.py::test_old_name", "tests/test_gone.py",
                                              "test_never_was", "tests/test_config.py::test_renamed"]


def test_means_over_seeds_are_not_retyped_in_the_docs():
    """A mean ± sd over seeds is the benchmark's generated table (README, benchmarks/*.md), never a copy in
    prose, where it would stay behind when the profile or the runs change (it did: docs/results.md called
    the 160 px profile's figures the default's). Sections marked superseded are records and keep theirs."""
    found = {}
    for page in PAGES:
        text = GENERATED.sub("", page.read_text())
        for section in re.split(r"^(?=#+ )", text, flags=re.MULTILINE):
            heading = section.split("\n", 1)[0]
            if "superseded" not in heading and (figures := MEAN_AND_SPREAD.findall(section)):
                found.setdefault(page.relative_to(REPO).as_posix(), []).append((heading, figures))
    assert not found, f"means over seeds typed into the docs; point to the generated table instead: {found}"


def readme_map_entries() -> dict[str, str]:
    """The README's map of src/pneumonia/: {entry ("data/", "config.py", ...): its text, continuation lines
    included}."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("## Where things are"):readme.index("## Documentation")]
    lines = block[block.index("\nsrc/pneumonia/"):].splitlines()[1:]
    entries, current = {}, None
    for line in lines:
        if re.match(r"  \S", line):  # an entry of the library
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif line.startswith("   ") and current:  # the entry's continuation
            entries[current] += " " + line.strip()
        elif line.strip():
            current = None  # back at the top level: tests/, data_sample/, ...
    return entries


def test_readme_map_names_every_library_module():
    entries = readme_map_entries()
    text = " ".join(entries.values())
    unnamed = []
    for file in sorted((REPO / "src" / "pneumonia").rglob("*.py")):
        if file.name == "__init__.py":
            continue
        package = file.parent.relative_to(REPO / "src" / "pneumonia").as_posix()
        named = (f"{file.name}" in text if package == "." else
                 bool(re.search(rf"\b{file.stem}\b", entries.get(f"{package}/", ""))))
        if not named:
            unnamed.append(file.relative_to(REPO / "src").as_posix())
    assert not unnamed, f"README's map (Where things are) leaves out {unnamed}"
