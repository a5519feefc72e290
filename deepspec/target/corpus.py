"""The tiny target's text corpus: local source files, split into train / held-out by path hash.

The split depends only on each file's path relative to the corpus folder, so it is the same on
every machine and does not move when files are added or removed elsewhere in the folder.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

TRAIN, HELDOUT = "train", "heldout"

# Installed third-party packages live under the stdlib folder on many installs; they are not
# the standard library and differ between environments, so the default corpus leaves them out.
_THIRD_PARTY_DIRS = {"site-packages", "dist-packages"}


@dataclass(frozen=True)
class CorpusFile:
    relpath: str  # POSIX path relative to the corpus folder: the file's stable identity
    text: str
    split: str  # TRAIN or HELDOUT


def corpus_root(corpus_dir: Optional[str]) -> Path:
    return Path(corpus_dir if corpus_dir is not None else sysconfig.get_paths()["stdlib"])


def hash_fraction(key: str, salt: str = "") -> float:
    """Map a string to a stable number in [0, 1)."""
    digest = hashlib.sha1((salt + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(relpath: str, heldout_fraction: float) -> str:
    return HELDOUT if hash_fraction(relpath) < heldout_fraction else TRAIN


def list_corpus_paths(corpus_dir: Optional[str], corpus_glob: str) -> List[Path]:
    """Every regular file matching the glob, sorted by relative path. Raises if there are none."""
    root = corpus_root(corpus_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {str(root)!r} does not exist (corpus_glob={corpus_glob!r})")
    paths = []
    for path in root.glob(corpus_glob):
        rel = path.relative_to(root)
        if corpus_dir is None and _THIRD_PARTY_DIRS & set(rel.parts):
            continue
        if path.is_file():
            paths.append(path)
    if not paths:
        raise ValueError(f"corpus folder {str(root)!r} has no files matching {corpus_glob!r}")
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> Optional[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def load_corpus(
    corpus_dir: Optional[str] = None,
    corpus_glob: str = "**/*.py",
    heldout_fraction: float = 0.05,
    max_files: int = 0,
) -> List[CorpusFile]:
    """Readable, non-empty UTF-8 files of the corpus, sorted by relative path, each tagged with its split.

    With ``max_files > 0`` the files kept are the first ``max_files`` readable ones in a salted hash
    order: a deterministic sample spread over the whole tree (sorted order would take one package),
    and independent of the split hash (so the held-out share stays ``heldout_fraction``).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    root = corpus_root(corpus_dir)
    paths = list_corpus_paths(corpus_dir, corpus_glob)
    rel = {p: p.relative_to(root).as_posix() for p in paths}
    if max_files > 0:
        paths = sorted(paths, key=lambda p: hash_fraction(rel[p], salt="select:"))
    files = []
    for path in paths:
        text = _read_text(path)
        if text is None:
            continue
        files.append(CorpusFile(rel[path], text, split_of(rel[path], heldout_fraction)))
        if 0 < max_files <= len(files):
            break
    if not files:
        raise ValueError(f"corpus folder {str(root)!r} has no readable UTF-8 files matching {corpus_glob!r}")
    return sorted(files, key=lambda f: f.relpath)


def corpus_digest(files: List[CorpusFile]) -> str:
    """sha1 over relative paths and contents: what a build trained on this corpus depends on."""
    h = hashlib.sha1()
    for f in files:
        h.update(f.relpath.encode("utf-8") + b"\0")
        h.update(hashlib.sha1(f.text.encode("utf-8")).digest())
    return h.hexdigest()
