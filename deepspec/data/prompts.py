"""Conversations from files or the Hub, mapped to one schema: ``{"id", "messages": [{"role", "content"}]}``.

Records are read by :mod:`deepspec.data.sources` (local ``.jsonl`` / ``.json`` / ``.parquet`` files,
folders, globs, Hub datasets; a bad line is reported as ``file:line``); this module maps them.

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

import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from deepspec.data.sources import DataError, LoadStats, iter_raw
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
    for raw, where in iter_raw(path, on_error, stats, hub_config, hub_split, TURN_LIST_KEYS + PROMPT_KEYS):
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
