"""The two ways data can be wrong: absent (tell the user what to place where) or present but broken."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class BadDataError(ValueError):
    """A data set's files exist but some are unusable (bad labels, missing masks, unreadable images)."""


def missing_data(name: str, folder: Path, layout: str, missing: Sequence[Path | str] = ()) -> FileNotFoundError:
    """A FileNotFoundError naming the folder, the layout expected and the flag that downloads."""
    lines = [f"{name} data not found in {folder}."]
    if missing:
        lines.append("Missing: " + ", ".join(str(path) for path in missing[:5])
                     + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    lines.append(f"Expected layout:\n{layout}")
    lines.append("Pass --download to fetch it there, or --data-root to point at a folder that has this layout.")
    return FileNotFoundError("\n".join(lines))


def bad_data(name: str, problems: Sequence[str]) -> BadDataError:
    """A BadDataError listing the first problems, each naming its file."""
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    return BadDataError(f"{name}: {len(problems)} bad file(s); fix or remove them from the split lists:\n  {shown}{more}")


def download_failed(name: str, folder: Path, layout: str, error: Exception) -> RuntimeError:
    """A RuntimeError for a failed download that still says what to place where by hand."""
    return RuntimeError(f"Downloading {name} into {folder} failed ({type(error).__name__}: {error}).\n"
                        f"Without network access, place the files by hand in this layout:\n{layout}")
