"""Conversations from files or the Hub, mapped to one schema: ``{"id", "messages": [{"role", "content"}]}``.

Sources: local ``.jsonl`` / ``.json`` files (read here, line by line, so a bad line is reported as
``file:line``), ``.parquet`` files and Hub datasets (read through ``datasets``). A path may be a
file, a folder (its jsonl/json/parquet files, sorted), a glob, or several of these separated by
commas; anything that does not exist locally is taken as a Hub dataset name.

Schemas understood (``messages_key="auto"``):
  * a list of turns under ``messages`` / ``conversations`` / ``conversation`` / ``dialog`` / ``turns``,
    each turn ``{"role", "content"}`` (OpenAI) or ``{"from", "value"}`` (ShareGPT);
    roles human/user, gpt/assistant/model/chatgpt/bard/bing, system, tool/function/observation;
    content a string or a list of ``{"type": "text", "text": ...}`` parts;
  * flat records: ``prompt`` / ``instruction`` (+ ``input``) / ``question`` / ``query`` for the user turn
    and optionally ``response`` / ``output`` / ``answer`` / ``completion`` for the answer, plus an
    optional top-level ``system``.
A system message is kept only when the data has one: nothing is injected.

The train / held-out split is a stable hash of each record's id: it does not depend on file order
or on what else is in the data set.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from deepspec.config import OnError, check_choice
from deepspec.target.corpus import hash_fraction

log = logging.getLogger("deepspec")

TURN_LIST_KEYS = ("messages", "conversations", "conversation", "dialog", "turns")
ROLE_KEYS = ("role", "from", "speaker")
CONTENT_KEYS = ("content", "value", "text")
ROLE_MAP = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "bot": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}
PROMPT_KEYS = ("prompt", "instruction", "question", "query")
ANSWER_KEYS = ("response", "output", "answer", "completion")
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


# ----------------------------------------------------------------------------- schema mapping


def _text(value, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):  # OpenAI content parts
        parts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
            elif (
                isinstance(part, dict)
                and part.get("type", "text") == "text"
                and isinstance(part.get("text"), str)
            ):
                parts.append(part["text"])
            else:
                raise DataError(f"{where}: key {key!r} part {j} is not a text part ({str(part)[:80]!r})")
        return "".join(parts)
    raise DataError(
        f"{where}: key {key!r} must be a string or a list of text parts, got {type(value).__name__}"
    )


def _turn(turn, where: str, key: str) -> Dict[str, str]:
    if not isinstance(turn, dict):
        raise DataError(
            f"{where}: {key} must be an object with role/content (or from/value), got {type(turn).__name__}"
        )
    role_key = next((k for k in ROLE_KEYS if k in turn), None)
    content_key = next((k for k in CONTENT_KEYS if k in turn), None)
    if role_key is None:
        raise DataError(
            f"{where}: {key} has no role key (expected one of {list(ROLE_KEYS)}; keys: {sorted(turn)})"
        )
    if content_key is None and not turn.get("tool_calls"):
        raise DataError(
            f"{where}: {key} has no content key (expected one of {list(CONTENT_KEYS)}; keys: {sorted(turn)})"
        )
    raw_role = str(turn[role_key]).strip().lower()
    role = ROLE_MAP.get(raw_role)
    if role is None:
        raise DataError(
            f"{where}: {key}.{role_key}={turn[role_key]!r} is not a known role (known: {sorted(ROLE_MAP)})"
        )
    msg = {"role": role, "content": _text(turn.get(content_key), where, f"{key}.{content_key}")}
    if role == "assistant" and isinstance(turn.get("reasoning_content"), str) and turn["reasoning_content"]:
        msg["reasoning_content"] = turn["reasoning_content"]
    return msg


def to_messages(record: dict, where: str, messages_key: str = "auto") -> List[Dict[str, str]]:
    """The record's conversation in the common role/content schema (raises DataError naming ``where``)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if messages_key != "auto":
        if messages_key not in record:
            raise DataError(f"{where}: no key {messages_key!r} (data.messages_key); keys: {sorted(record)}")
        key = messages_key
    else:
        key = next((k for k in TURN_LIST_KEYS if k in record), None)
    if key is not None:
        turns = record[key]
        if not isinstance(turns, list):
            raise DataError(f"{where}: key {key!r} must be a list of turns, got {type(turns).__name__}")
        messages = [_turn(t, where, f"{key}[{j}]") for j, t in enumerate(turns)]
        system = record.get("system")
        if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return messages
    prompt_key = next((k for k in PROMPT_KEYS if k in record), None)
    if prompt_key is None:
        raise DataError(
            f"{where}: no conversation found (expected a list under one of {list(TURN_LIST_KEYS)} or a "
            f"prompt under one of {list(PROMPT_KEYS)}; keys: {sorted(record)})"
        )
    user = _text(record[prompt_key], where, prompt_key)
    extra = record.get("input") if prompt_key == "instruction" else None
    if isinstance(extra, str) and extra.strip():
        user = user + "\n\n" + extra
    messages = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"]})
    messages.append({"role": "user", "content": user})
    answer_key = next((k for k in ANSWER_KEYS if k in record and record[k] is not None), None)
    if answer_key is not None:
        messages.append({"role": "assistant", "content": _text(record[answer_key], where, answer_key)})
    return messages


def check_conversation(messages: Sequence[Dict[str, str]], where: str, need_assistant: bool) -> None:
    if not messages:
        raise DataError(f"{where}: empty conversation")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: conversation has no user turn (roles {[m['role'] for m in messages]})")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: conversation has no assistant turn (roles {[m['role'] for m in messages]})"
        )


# ----------------------------------------------------------------------------- sources


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


def _iter_json(path: Path, on_error: str, stats: LoadStats) -> Iterator[Tuple[dict, str]]:
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
        if any(k in obj for k in TURN_LIST_KEYS + PROMPT_KEYS) or len(lists) != 1:
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
) -> Iterator[Tuple[dict, str]]:
    """(raw record, where) for every record of every source, in order."""
    check_choice("data.on_error", on_error, OnError)
    stats = stats if stats is not None else LoadStats()
    files, hub = resolve_files(path)
    if not files and not hub:
        raise DataError(f"data path {path!r} names nothing")
    for f in files:
        if f.name.endswith(".jsonl"):
            yield from _iter_jsonl(f, on_error, stats)
        elif f.name.endswith(".json"):
            yield from _iter_json(f, on_error, stats)
        elif f.name.endswith(".parquet"):
            yield from _iter_parquet(f)
        else:
            raise DataError(f"{f}: unsupported file type (expected {', '.join(FILE_SUFFIXES)})")
    for name in hub:
        yield from _iter_hub(name, hub_config, hub_split)


def load_conversations(
    path: str,
    *,
    messages_key: str = "auto",
    id_key: str = "id",
    on_error: str = "stop",
    need_assistant: bool = False,
    hub_config: Optional[str] = None,
    hub_split: str = "train",
    max_records: int = 0,
    stats: Optional[LoadStats] = None,
) -> List[dict]:
    """Records ``{"id", "messages"}`` (plus ``"where"``) in source order; bad ones raise or are skipped and counted.

    Ids come from ``id_key`` when present (else ``<file stem>:<line>``) and must be unique, since
    regeneration resumes and the split is keyed by them.
    """
    stats = stats if stats is not None else LoadStats()
    out: List[dict] = []
    seen: Dict[str, str] = {}
    for raw, where in iter_raw(path, on_error, stats, hub_config, hub_split):
        if max_records and len(out) >= max_records:
            break
        stats.read += 1
        try:
            messages = to_messages(raw, where, messages_key)
            check_conversation(messages, where, need_assistant)
            rid = raw.get(id_key) if isinstance(raw, dict) else None
            rid = str(rid) if rid is not None and str(rid) != "" else _default_id(where)
            if rid in seen:
                raise DataError(
                    f"{where}: id {rid!r} already used at {seen[rid]} (ids must be unique; key {id_key!r})"
                )
        except DataError as e:
            if on_error == "stop":
                raise
            reason = "no_assistant_turn" if "no assistant turn" in str(e) else "invalid_record"
            stats.skip(reason, str(e))
            continue
        seen[rid] = where
        out.append({"id": rid, "messages": messages, "where": where})
        stats.kept += 1
    if stats.num_skipped:
        log.warning(
            "%s: skipped %d of %d records (%s); first: %s",
            path,
            stats.num_skipped,
            stats.read,
            ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())),
            stats.first_error,
        )
    return out


def _default_id(where: str) -> str:
    # "dir/file.jsonl:12" -> "file:12"; "name row 3" -> "name:3"; "file.json[4]" -> "file:4"
    if " row " in where:
        name, row = where.rsplit(" row ", 1)
        return f"{Path(name.split('[')[0]).stem}:{row}"
    if where.endswith("]"):
        name, idx = where[:-1].rsplit("[", 1)
        return f"{Path(name).stem}:{idx}"
    name, line = where.rsplit(":", 1)
    return f"{Path(name).stem}:{line}"


# ----------------------------------------------------------------------------- split


def split_records(
    records: Iterable[dict], heldout_fraction: float, seed: int = 0, heldout_max: int = 0
) -> Dict[str, List[dict]]:
    """{"train", "heldout"} by a stable hash of each id (independent of order and of other records)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction={heldout_fraction}: must be in [0, 1)")
    train, held = [], []
    for r in records:
        (
            held if hash_fraction(str(r["id"]), salt=f"deepspec-split-{seed}:") < heldout_fraction else train
        ).append(r)
    if heldout_max > 0:
        held = held[:heldout_max]
    return {"train": train, "heldout": held}


def load_chat_splits(data_cfg) -> Dict[str, List[dict]]:
    """``data.source=chat``: conversations with at least one assistant turn, split train / held-out."""
    if not data_cfg.path:
        raise DataError(
            "data.source=chat needs data.path (a jsonl/json/parquet file, folder, glob or hub dataset)"
        )
    records = load_conversations(
        data_cfg.path,
        messages_key=data_cfg.messages_key,
        id_key=data_cfg.id_key,
        on_error=data_cfg.on_error,
        need_assistant=True,
        hub_config=data_cfg.hub_config,
        hub_split=data_cfg.hub_split,
    )
    if not records:
        raise DataError(f"{data_cfg.path}: no usable conversation")
    return split_records(records, data_cfg.heldout_fraction, data_cfg.split_seed, data_cfg.heldout_max)
