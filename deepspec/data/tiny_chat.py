"""A tiny chat data set cut from Python sources: user = a function's signature (+ docstring),
assistant = its body. It gives the embedded target a real chat format to learn and the drafter
real prompts, without any download.
"""

from __future__ import annotations

import ast
import textwrap
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from deepspec.target.corpus import HELDOUT, TRAIN, CorpusFile, load_corpus

MIN_BODY_CHARS = 32  # below this a body is `pass`, `return self._x`, `raise NotImplementedError`
MAX_BODY_CHARS = 1200  # keeps a pair within a few hundred tokens of the tiny tokenizer


def _functions(tree: ast.AST) -> Iterator[Tuple[str, ast.AST]]:
    """(qualname, node) for every function and method, nested ones included, in source order."""

    def visit(node: ast.AST, prefix: str) -> Iterator[Tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = prefix + child.name
                yield qualname, child
                yield from visit(child, qualname + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, prefix + child.name + ".")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def _split_function(lines: List[str], node) -> Optional[Tuple[str, str]]:
    """(signature + docstring, body without docstring), both dedented; None if not line-separable."""
    body = node.body
    doc = body[0] if body and ast.get_docstring(node, clean=False) is not None else None
    rest = body[1:] if doc is not None else body
    if not rest:
        return None
    # Header = the `def` line(s) up to the docstring's end, or up to the first statement.
    header_end = doc.end_lineno if doc is not None else rest[0].lineno - 1
    if header_end < node.lineno or rest[0].lineno <= header_end:
        return None  # one-liners such as `def f(): return 1` or `"""doc"""; x = 1`
    # Comments and blank lines before the first statement belong to the body, not the signature.
    while header_end > node.lineno and lines[header_end - 1].strip()[:1] in ("", "#"):
        header_end -= 1
    header = textwrap.dedent("".join(lines[node.lineno - 1 : header_end])).rstrip()
    answer = textwrap.dedent("".join(lines[header_end : node.end_lineno])).strip("\n").rstrip()
    # Leading whitespace survives dedent when a string literal reaches column 0; such a turn would
    # also merge with the template's "\n" into one token across the prompt/answer boundary.
    if not header or not answer or header[0].isspace() or answer[0].isspace():
        return None
    return header, answer


def _file_pairs(f: CorpusFile, min_body_chars: int, max_body_chars: int) -> List[Dict]:
    try:
        tree = ast.parse(f.text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []  # the stdlib test suite carries deliberately broken files
    lines = f.text.splitlines(keepends=True)
    pairs, seen = [], {}
    for qualname, node in _functions(tree):
        split = _split_function(lines, node)
        if split is None:
            continue
        header, answer = split
        if not min_body_chars <= len(answer) <= max_body_chars:
            continue
        # Redefinitions (property setters, platform branches) share a qualname: number them.
        seen[qualname] = seen.get(qualname, 0) + 1
        suffix = "" if seen[qualname] == 1 else f"#{seen[qualname]}"
        pairs.append(
            {
                "id": f"{f.relpath}::{qualname}{suffix}",
                "messages": [
                    {"role": "user", "content": header},
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    return pairs


def chat_pairs(
    files: Sequence[CorpusFile],
    split: str,
    min_body_chars: int = MIN_BODY_CHARS,
    max_body_chars: int = MAX_BODY_CHARS,
) -> List[Dict]:
    """Chat records from the files of one split (``"train"`` or ``"heldout"``), in path then source order."""
    if split not in (TRAIN, HELDOUT):
        raise ValueError(f"split must be {TRAIN!r} or {HELDOUT!r}, got {split!r}")
    pairs: List[Dict] = []
    for f in sorted(files, key=lambda f: f.relpath):
        if f.split == split:
            pairs.extend(_file_pairs(f, min_body_chars, max_body_chars))
    return pairs


def tiny_chat_splits(cfg, **kwargs) -> Dict[str, List[Dict]]:
    """``{"train": [...], "heldout": [...]}`` for a TinyTargetConfig's corpus and split."""
    files = load_corpus(cfg.corpus_dir, cfg.corpus_glob, cfg.heldout_fraction, cfg.max_files)
    return {split: chat_pairs(files, split, **kwargs) for split in (TRAIN, HELDOUT)}
