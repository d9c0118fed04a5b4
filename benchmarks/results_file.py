"""Shared by the benchmark scripts: each owns one `## ` section of benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section starting at `heading` (up to the next `## ` heading) or append it; keep everything
    else. The file is read right before writing so concurrent edits to other sections survive."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nNumbers measured by the scripts in `benchmarks/`.\n"
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before = "\n".join(lines[:start]).rstrip("\n")
        after = "\n".join(lines[end:])
        new = (before + "\n\n" if before else "") + section.rstrip("\n") + "\n" + ("\n" + after.rstrip("\n") + "\n" if after else "")
    path.write_text(new)
