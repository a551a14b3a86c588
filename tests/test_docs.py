"""The user's documents hold together: every link between README.md and docs/*.md reaches a file and a heading that
exist, and every saved result file the benchmark record names is in the repository (a figure is only as good as the
file behind it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
RESULT_PATH = re.compile(r"benchmarks/results/[\w./-]*\w")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a document's headings: lower case, punctuation dropped, spaces to hyphens, a repeated
    heading numbered -1, -2, ...; headings inside fenced code blocks are not headings."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", "")).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_heading_anchors_follow_githubs_rule():
    text = "# Quickstart screen (make demo)\n## Screen at scale (100,000 candidates)\n## DFT\n### DFT\n```\n# x\n```"
    assert heading_anchors(text) == {"quickstart-screen-make-demo", "screen-at-scale-100000-candidates", "dft", "dft-1"}


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_reaches_a_file_and_heading(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue  # outside the repository: not checked offline
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_saved_result_named_exists(doc):
    missing = sorted({p for p in RESULT_PATH.findall(doc.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{doc.relative_to(ROOT)} cites saved results that are not in the repository: {missing}"


def test_saved_quickstart_summary_is_what_its_saved_results_say():
    """The demo's figures in the docs come from quickstart_demo.json; that file must agree with the results.csv saved
    beside it (signed hull: within 0.1 / 0.05 eV/atom, below every known phase)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("quickstart_demo", ROOT / "benchmarks" / "quickstart_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = json.loads((ROOT / "benchmarks/results/quickstart_demo.json").read_text())
    again = module.summarise(ROOT / "benchmarks/results/quickstart_results.csv")
    assert again["within"] == saved["within"] == {"0.1": 137, "0.05": 83}
    assert [r["formula"] for r in again["below_known_hull"]] == ["LiCdP", "LiCdSb", "MgTe", "MgTe"]
    assert all(-0.1 < r["e_above_hull"] < 0 for r in again["below_known_hull"])
    assert again["status"] == {"ok": 193}
