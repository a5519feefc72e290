"""A tiny chat data set cut from any text corpus, so the embedded target learns a real chat format
and the drafter gets real prompts without any download.

Python files that parse are cut at functions: user = the signature (+ docstring), assistant = the
body. Every other file (another language, prose, a Python file that does not parse) is cut into
chunks of whole lines: user = the start of a chunk, assistant = its continuation.
"""

from __future__ import annotations

import ast
import textwrap
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from deepspec.target.corpus import HELDOUT, TRAIN, CorpusFile, load_corpus

MIN_BODY_CHARS = 32  # below this a body is `pass`, `return self._x`, `raise NotImplementedError`
MAX_BODY_CHARS = 1200  # keeps a pair within a few hundred tokens of the tiny tokenizer
PROMPT_SHARE = 1 / 3  # of a chunk's characters, roughly, go to the prompt


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


def _record(relpath: str, name: str, user: str, assistant: str) -> Dict:
    return {
        "id": f"{relpath}::{name}",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
    }


def _function_pairs(f: CorpusFile, tree: ast.AST, min_body_chars: int, max_body_chars: int) -> List[Dict]:
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
        pairs.append(_record(f.relpath, qualname + suffix, header, answer))
    return pairs


def _lines(text: str, limit: int) -> List[str]:
    """The text's lines, each longer than ``limit`` broken at spaces (minified code, long paragraphs)."""
    out = []
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            cut = line.rfind(" ", 0, limit)
            cut = limit if cut <= 0 else cut + 1
            out.append(line[:cut])
            line = line[cut:]
        if line:
            out.append(line)
    return out


def _chunks(text: str, max_chars: int) -> Iterator[List[str]]:
    """Consecutive runs of whole lines of at most ``max_chars`` characters, in order."""
    chunk: List[str] = []
    size = 0
    for line in _lines(text, max_chars // 2):
        if chunk and size + len(line) > max_chars:
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield chunk


def _split_chunk(chunk: List[str]) -> Optional[Tuple[str, str]]:
    """(start, continuation) of a chunk, cut at the line start nearest a third of its characters.

    The continuation must begin with a visible character: leading whitespace would merge with the
    template's "\n" into one token across the prompt/answer boundary.
    """
    total = sum(len(line) for line in chunk)
    best, best_gap, done = None, None, 0
    for j, line in enumerate(chunk):
        if j and line[:1].strip() and "".join(chunk[:j]).strip():
            gap = abs(done - total * PROMPT_SHARE)
            if best_gap is None or gap < best_gap:
                best, best_gap = j, gap
        done += len(line)
    if best is None:
        return None
    prompt = "".join(chunk[:best]).strip()
    answer = "".join(chunk[best:]).rstrip()
    return (prompt, answer) if prompt and answer else None


def _chunk_pairs(f: CorpusFile, min_body_chars: int, max_body_chars: int) -> List[Dict]:
    pairs = []
    for i, chunk in enumerate(_chunks(f.text, max_body_chars + max_body_chars // 2)):
        split = _split_chunk(chunk)
        if split is not None and min_body_chars <= len(split[1]) <= max_body_chars:
            pairs.append(_record(f.relpath, f"chunk{i}", *split))
    return pairs


def _file_pairs(f: CorpusFile, min_body_chars: int, max_body_chars: int) -> List[Dict]:
    if f.relpath.endswith(".py"):
        try:
            tree = ast.parse(f.text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            tree = None  # the stdlib test suite carries deliberately broken files: cut them as text
        if tree is not None:
            return _function_pairs(f, tree, min_body_chars, max_body_chars)
    return _chunk_pairs(f, min_body_chars, max_body_chars)


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


def check_pairs(cfg, counts: Dict[str, int]) -> None:
    """Stop (before any build or training) when the corpus gives no chat pair to learn from."""
    empty = [split for split in (TRAIN, HELDOUT) if not counts.get(split)]
    if empty:
        from deepspec.target.corpus import corpus_root

        raise ValueError(
            f"the tiny chat data cut from corpus {str(corpus_root(cfg.corpus_dir))!r} (glob "
            f"{cfg.corpus_glob!r}) has {counts.get(TRAIN, 0)} train and {counts.get(HELDOUT, 0)} held-out "
            f"pairs; need both. Point target.tiny.corpus_dir / target.tiny.corpus_glob at more text, or "
            f"raise target.tiny.max_files (now {cfg.max_files}) or change target.tiny.heldout_fraction "
            f"(now {cfg.heldout_fraction})"
        )


def tiny_chat_splits(cfg, **kwargs) -> Dict[str, List[Dict]]:
    """``{"train": [...], "heldout": [...]}`` for a TinyTargetConfig's corpus and split."""
    files = load_corpus(cfg.corpus_dir, cfg.corpus_glob, cfg.heldout_fraction, cfg.max_files)
    splits = {split: chat_pairs(files, split, **kwargs) for split in (TRAIN, HELDOUT)}
    check_pairs(cfg, {k: len(v) for k, v in splits.items()})
    return splits
