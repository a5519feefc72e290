"""Evaluation prompts: the first user turn of each record of a dataset, read with `datasets`.

A dataset is named by one string:

* ``tiny``: the tiny target's held-out chat pairs (functions from files never trained on);
* ``gsm8k`` / ``humaneval`` / ``math500`` / ``mt-bench``: the hub benchmarks, with their prompt column;
* a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file: records with a ``turns`` list
  (``{"turns": ["first user message", ...]}``; another column via ``eval.prompt_column``);
* any other hub dataset id: split ``eval.dataset_split``, column ``eval.prompt_column``.

A column value may be a string, a list of turns (the first is used) or a list of chat messages
(the first user message is used).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

# name -> (hub id, config, split, prompt column)
HUB_DATASETS: Dict[str, tuple] = {
    "gsm8k": ("openai/gsm8k", "main", "test", "question"),
    "humaneval": ("openai/openai_humaneval", None, "test", "prompt"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem"),
    "mt-bench": ("HuggingFaceH4/mt_bench_prompts", None, "train", "prompt"),
}
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _first_turn(value, where: str) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)) and value:
        first = value[0]
        if isinstance(first, dict):  # chat messages
            first = next(
                (m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"), None
            )
        text = first
    else:
        text = None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"{where}: expected a non-empty string, a list of turns or chat messages; got {value!r:.80}"
        )
    return text


def _column(ds, column: str, where: str) -> List[str]:
    names = list(ds.column_names)
    if column not in names:
        raise ValueError(
            f"{where} has no key {column!r} (found keys: {names}); each record needs "
            f'"{column}": [first user message, ...] (or set eval.prompt_column to the column holding the prompt)'
        )
    return [_first_turn(v, f"{where}, record {i}, key {column!r}") for i, v in enumerate(ds[column])]


def _local(path: str, column: str) -> List[str]:
    import datasets

    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_FORMATS:
        raise ValueError(f"{path}: unsupported file type {ext!r}; expected one of {sorted(LOCAL_FORMATS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation dataset file {path} not found")
    try:
        ds = datasets.load_dataset(LOCAL_FORMATS[ext], data_files=os.path.abspath(path), split="train")
    except Exception as e:  # datasets wraps parse errors in many types; name the file
        raise ValueError(
            f"{path}: could not be read as {LOCAL_FORMATS[ext]} ({type(e).__name__}: {e})"
        ) from e
    if len(ds) == 0:
        raise ValueError(f"{path}: no records")
    return _column(ds, column, path)


def _hub(repo: str, config: Optional[str], split: str, column: str) -> List[str]:
    import datasets

    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        raise ValueError(
            f"could not load hub dataset {repo!r} (config {config!r}, split {split!r}): {type(e).__name__}: {e}. "
            "Offline? Pass a local .jsonl with a 'turns' list instead."
        ) from e
    return _column(ds, column, f"hub dataset {repo} [{split}]")


def _tiny(tiny_cfg) -> List[str]:
    from deepspec.data.tiny_chat import tiny_chat_splits

    records = tiny_chat_splits(tiny_cfg)["heldout"]
    return [
        _first_turn(r["messages"], f"tiny held-out record {r.get('id', i)}") for i, r in enumerate(records)
    ]


def dataset_labels(names: Sequence[str]) -> Dict[str, str]:
    """Name -> the label used in eval.json, the console table and plot file names: a local file's
    base name (``/data/my_prompts.jsonl`` -> ``my_prompts.jsonl``), the name itself otherwise or
    where two files share a base name."""
    base = {n: os.path.basename(n) if os.path.isfile(n) else n for n in names}
    counts: Dict[str, int] = {}
    for b in base.values():
        counts[b] = counts.get(b, 0) + 1
    return {n: b if counts[b] == 1 else n for n, b in base.items()}


def load_prompt_texts(name: str, cfg) -> List[str]:
    """First user turns of dataset ``name`` (see module docstring); ``cfg`` is the whole config tree."""
    e = cfg.eval
    if name == "tiny":
        return _tiny(cfg.target.tiny)
    if name in HUB_DATASETS:
        repo, config, split, column = HUB_DATASETS[name]
        return _hub(repo, config, split, column)
    if os.path.splitext(name)[1].lower() in LOCAL_FORMATS or os.path.exists(name):
        return _local(name, e.prompt_column)
    return _hub(name, None, e.dataset_split, e.prompt_column)


def select(texts: Sequence[str], num: int, seed: int) -> List[str]:
    """``num`` prompts drawn without replacement with ``seed`` (all, in order, when num <= 0 or >= len)."""
    if num <= 0 or num >= len(texts):
        return list(texts)
    idx = np.sort(np.random.default_rng(seed).choice(len(texts), size=num, replace=False))
    return [texts[i] for i in idx]


def heldout_eval_records(records: Sequence[dict], eval_cfg) -> List[dict]:
    """The held-out records training evaluates at its end: the first ``eval.num_prompts``, or with
    ``eval.sample_heldout`` a sample drawn with ``eval.seed`` (benchmarks over seeds vary the prompts
    too, while every drafter trained with one seed still sees the same ones)."""
    if getattr(eval_cfg, "sample_heldout", False):
        return select(list(records), eval_cfg.num_prompts, eval_cfg.seed)
    return list(records[: eval_cfg.num_prompts])


def tokenize_prompts(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    """Render each text as the first user turn with the chat template and the generation prompt."""
    from deepspec.data.chat import prompt_ids

    return [prompt_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]
