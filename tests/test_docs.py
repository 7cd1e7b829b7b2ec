"""Tests of the docs: relative links resolve, and the README's set-up lines are the CI's."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of [text](target) and ![alt](target)


def relative_links(path: Path) -> list[str]:
    """Link targets in a markdown file that are not URLs or anchors, without their #fragment."""
    targets = LINK.findall(path.read_text())
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]


def ci_commands() -> dict:
    """The commands .ci/run runs, keyed by the comment line above each ("set-up", "test")."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    found = {}
    for above, line in zip(lines, lines[1:]):
        if above.startswith("# the README's set-up"):
            found["set-up"] = line.strip()
        if above.startswith("# the README's test"):
            found["test"] = line.strip()
    return found


def readme_setup() -> dict:
    """The three commented lines of the README's first bash block, keyed by their comment."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    lines = {}
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        lines[comment.strip()] = command.strip()
    return lines


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_points_to_a_file(path):
    links = relative_links(path)
    missing = [t for t in links if not (path.parent / t).exists()]
    assert not missing, f"{path.name} links to files that do not exist: {missing}"


def test_the_link_check_sees_links_and_would_catch_a_missing_file(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("[a](a.md) ![b](img/b.png) [web](https://example.org) [here](#top) [c](c.md#s)")
    assert relative_links(doc) == ["a.md", "img/b.png", "c.md"]
    assert all(relative_links(p) for p in DOCS[:2])  # the README and the first doc do link


def test_readme_test_command_is_the_ci_command():
    setup, ci = readme_setup(), ci_commands()
    assert setup["the tests"] == ci["test"] == "python -m pytest -q"


def test_readme_setup_installs_what_the_ci_installs():
    setup, ci = readme_setup(), ci_commands()
    readme_args = setup["set-up"].split()
    ci_args = [a for a in ci["set-up"].split() if not a.startswith("--")]
    assert readme_args[:2] == ["pip", "install"]
    assert ci_args[:4] == ["python", "-m", "pip", "install"]
    assert readme_args[2:] == ci_args[4:]


def test_readme_main_job_is_the_bundled_demo():
    setup = readme_setup()
    command = setup["the main job, on the bundled demo cube"]
    assert command == "python fit_cube.py data/demo_cube.fits --mol CH3OH"
    assert (ROOT / "data" / "demo_cube.fits").is_file()


def test_readme_sends_no_reader_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    first_paragraph = text.split("\n\n")[1]
    assert "../" not in first_paragraph and "METHOD.md" not in text
