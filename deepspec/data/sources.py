"""Where prompt records come from: local JSON lines / JSON / parquet files and Hub datasets.

A path may be a file, a folder (its jsonl/json/parquet files, sorted), a glob, or several of these
separated by commas; anything that does not exist locally is taken as a Hub dataset name. JSON lines
are read as bytes and decoded line by line, so a bad line is reported as ``file:line`` and can be
skipped (``data.on_error=skip``) instead of ending the read. Mapping records to conversations is
:mod:`deepspec.data.prompts`.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from deepspec.config import OnError, check_choice

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A record or file that cannot be read; the message names the file, line and key."""


@dataclass
class LoadStats:
    read: int = 0
    kept: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> count
    first_error: Optional[str] = None

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if self.first_error is None:
            self.first_error = message

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def resolve_files(path: str) -> Tuple[List[Path], List[str]]:
    """(local files, hub names) named by a comma-separated list of files, folders and globs."""
    files: List[Path] = []
    hub: List[str] = []
    for item in (p.strip() for p in str(path).split(",")):
        if not item:
            continue
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.name.endswith(FILE_SUFFIXES))
            if not found:
                raise DataError(f"{p}: folder holds no {'/'.join(FILE_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif any(c in item for c in "*?["):
            found = sorted(
                Path(q) for q in glob.glob(os.path.expanduser(item), recursive=True) if os.path.isfile(q)
            )
            if not found:
                raise DataError(f"{item}: glob matches no file")
            files.extend(found)
        elif item.endswith(FILE_SUFFIXES) or item.startswith((".", "/", "~")):
            raise DataError(f"{item}: no such file")
        else:
            hub.append(item)
    return files, hub


def _iter_jsonl(path: Path, on_error: str, stats: LoadStats) -> Iterator[Tuple[dict, str]]:
    # Read bytes and decode line by line: a stray non-UTF-8 byte is then one bad record (named, and
    # skippable), not an exception from the middle of the file reader.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                reason, err = (
                    "not_utf8",
                    f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                )
            except json.JSONDecodeError as e:
                reason, err = "malformed_json", f"{where}: malformed JSON ({e.msg} at column {e.colno})"
            else:
                yield obj, where
                continue
            if on_error == "stop":
                raise DataError(err + "; set data.on_error=skip to skip and count such lines") from None
            stats.read += 1
            stats.skip(reason, err)


def _iter_json(
    path: Path, on_error: str, stats: LoadStats, record_keys: Sequence[str]
) -> Iterator[Tuple[dict, str]]:
    data = path.read_bytes()
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        try:  # one JSON document: nothing to skip, name the place
            json.loads(data.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            yield from _iter_jsonl(path, on_error, stats)  # JSON lines: the bad line is skippable
            return
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); fix the file or convert it to "
            "JSON lines, where data.on_error=skip can skip such a record"
        ) from None
    except json.JSONDecodeError:
        # Many ".json" files are JSON lines.
        yield from _iter_jsonl(path, on_error, stats)
        return
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if any(k in obj for k in record_keys) or len(lists) != 1:
            obj = [obj]
        else:
            obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(obj).__name__}")
    for j, rec in enumerate(obj):
        yield rec, f"{path}[{j}]"


def _iter_dataset(ds, name: str) -> Iterator[Tuple[dict, str]]:
    for j, rec in enumerate(ds):
        yield rec, f"{name} row {j}"


def _iter_parquet(path: Path) -> Iterator[Tuple[dict, str]]:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train")
    yield from _iter_dataset(ds, str(path))


def _iter_hub(name: str, config: Optional[str], split: str) -> Iterator[Tuple[dict, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, wrong split...
        raise DataError(
            f"{name!r} is not a local file, folder or glob, and loading it as a Hub dataset failed: "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from e
    yield from _iter_dataset(ds, f"{name}[{split}]")


def iter_raw(
    path: str,
    on_error: str = "stop",
    stats: Optional[LoadStats] = None,
    hub_config: Optional[str] = None,
    hub_split: str = "train",
    record_keys: Sequence[str] = (),
) -> Iterator[Tuple[dict, str]]:
    """(raw record, where) for every record of every source, in order. ``record_keys``: keys that mark
    a JSON object as one record (not a wrapper holding a list of records)."""
    check_choice("data.on_error", on_error, OnError)
    stats = stats if stats is not None else LoadStats()
    files, hub = resolve_files(path)
    if not files and not hub:
        raise DataError(f"data path {path!r} names nothing")
    for f in files:
        if f.name.endswith(".jsonl"):
            yield from _iter_jsonl(f, on_error, stats)
        elif f.name.endswith(".json"):
            yield from _iter_json(f, on_error, stats, record_keys)
        elif f.name.endswith(".parquet"):
            yield from _iter_parquet(f)
        else:
            raise DataError(f"{f}: unsupported file type (expected {', '.join(FILE_SUFFIXES)})")
    for name in hub:
        yield from _iter_hub(name, hub_config, hub_split)
