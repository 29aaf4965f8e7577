"""The repository's results document (docs/RESULTS.md, written by analysis.bench.results_report):
the pieces the Overview shows. Pure text functions, no Streamlit."""
from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"


def without_comments(markdown: str) -> str:
    """The document without its HTML comments (st.markdown would print them)."""
    return re.sub(r"<!--.*?-->\s*", "", markdown, flags=re.S)


def lead_sentence(markdown: str) -> str | None:
    """The first sentence of the first paragraph of a document's first `## ` section (its
    answer, in RESULTS.md), with a bold span closed if the sentence ends inside one."""
    section = markdown.partition("\n## ")[2]
    for block in section.split("\n\n")[1:]:
        block = " ".join(block.split())
        if block and not block.startswith(("|", "```", "#", "-")):
            sentence = re.match(r".*?[.!?](?:\*\*)?(?=\s|$)", block)
            return sentence.group(0) if sentence else block
    return None


def first_table(markdown: str) -> str | None:
    """The first markdown table of a document (its consecutive `|` lines outside code), or None."""
    lines, table, fenced = markdown.splitlines(), [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced and line.lstrip().startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table) if len(table) >= 2 else None
