"""Prompt/conversation loading: schemas and role mapping, clear errors, skip-and-count, stable split."""

from __future__ import annotations

import json

import pytest

from deepspec.data.prompts import DataError, LoadStats, load_conversations, split_records, to_messages


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_role_mapping_schemas():
    share = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"},
        ]
    }
    assert to_messages(share, "x") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    oai = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c", "reasoning_content": "r"},
        ]
    }
    assert to_messages(oai, "x") == [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c", "reasoning_content": "r"},
    ]
    assert to_messages({"instruction": "do", "input": "this", "output": "done"}, "x") == [
        {"role": "user", "content": "do\n\nthis"},
        {"role": "assistant", "content": "done"},
    ]
    assert to_messages({"question": "2+2?", "answer": "4"}, "x")[1] == {"role": "assistant", "content": "4"}
    assert to_messages({"prompt": "p"}, "x") == [{"role": "user", "content": "p"}]  # no system injected
    assert to_messages({"system": "S", "prompt": "p"}, "x")[0] == {"role": "system", "content": "S"}
    assert to_messages({"dialog": [{"role": "model", "content": "m"}]}, "x", "dialog") == [
        {"role": "assistant", "content": "m"}
    ]


@pytest.mark.parametrize(
    "record,match",
    [
        (
            {"conversations": [{"from": "alien", "value": "x"}]},
            r"f\.jsonl:7: conversations\[0\]\.from='alien' is not a known role",
        ),
        ({"messages": [{"content": "x"}]}, r"f\.jsonl:7: messages\[0\] has no role key"),
        ({"messages": [{"role": "user"}]}, r"f\.jsonl:7: messages\[0\] has no content key"),
        ({"messages": "hi"}, r"f\.jsonl:7: key 'messages' must be a list"),
        ({"text": "hi"}, r"f\.jsonl:7: no conversation found .*keys: \['text'\]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
            r"f\.jsonl:7: key 'messages\[0\]\.content' part 0 is not a text part",
        ),
    ],
)
def test_errors_name_file_line_and_key(record, match):
    with pytest.raises(DataError, match=match):
        to_messages(record, "f.jsonl:7")


def test_malformed_line_stop_or_skip(tmp_path):
    p = jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "id": "a",
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            },
            '{"id": "b", "messages": [',
            "",
            {"id": "c", "messages": [{"role": "user", "content": "only a question"}]},
            {
                "id": "d",
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z"}],
            },
        ],
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON .*data\.on_error=skip"):
        load_conversations(str(p))
    q = jsonl(
        tmp_path / "q.jsonl", [{"id": "c", "messages": [{"role": "user", "content": "only a question"}]}]
    )
    with pytest.raises(DataError, match=r"q\.jsonl:1: conversation has no assistant turn"):
        load_conversations(str(q), need_assistant=True)
    assert len(load_conversations(str(q))) == 1  # fine as a prompt for regeneration
    stats = LoadStats()
    recs = load_conversations(str(p), on_error="skip", need_assistant=True, stats=stats)
    assert [r["id"] for r in recs] == ["a", "d"]
    assert stats.skipped == {"malformed_json": 1, "no_assistant_turn": 1} and stats.read == 4
    assert recs[0]["where"].endswith("d.jsonl:1")


def test_ids_sources_and_duplicates(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"prompt": "p1"}, {"prompt": "p2"}])
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"id": 7, "prompt": "p3"}]}))
    recs = load_conversations(str(tmp_path))  # a folder: its files, sorted
    assert [r["id"] for r in recs] == ["a:1", "a:2", "7"]
    assert [r["id"] for r in load_conversations(f"{tmp_path}/*.jsonl,{tmp_path}/b.json")] == [
        "a:1",
        "a:2",
        "7",
    ]
    jsonl(tmp_path / "dup.jsonl", [{"id": "x", "prompt": "p"}, {"id": "x", "prompt": "q"}])
    with pytest.raises(DataError, match=r"dup\.jsonl:2: id 'x' already used at .*dup\.jsonl:1"):
        load_conversations(str(tmp_path / "dup.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load_conversations(str(tmp_path / "missing.jsonl"))


def test_parquet_through_datasets(tmp_path):
    import datasets

    datasets.Dataset.from_list(
        [
            {"id": "p0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"id": "p1", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        ]
    ).to_parquet(str(tmp_path / "x.parquet"))
    recs = load_conversations(str(tmp_path / "x.parquet"), need_assistant=True)
    assert [r["id"] for r in recs] == ["p0", "p1"] and recs[1]["messages"][1] == {
        "role": "assistant",
        "content": "b",
    }


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    import datasets

    calls = []

    def offline(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="not a local file.*Hub dataset failed: ConnectionError"):
        load_conversations("someone/no-such-dataset-xyz", hub_split="test")
    assert calls == [("someone/no-such-dataset-xyz", None, "test")]


def test_split_is_stable_and_order_free():
    recs = [{"id": f"r{i}"} for i in range(2000)]
    s = split_records(recs, 0.1, seed=0)
    assert 150 < len(s["heldout"]) < 250 and len(s["train"]) + len(s["heldout"]) == 2000
    rev = split_records(list(reversed(recs)) + [{"id": "new"}], 0.1, seed=0)
    assert {r["id"] for r in rev["heldout"]} - {"new"} == {r["id"] for r in s["heldout"]}
    assert {r["id"] for r in split_records(recs, 0.1, seed=1)["heldout"]} != {r["id"] for r in s["heldout"]}
    assert len(split_records(recs, 0.1, heldout_max=5)["heldout"]) == 5


def test_sample_prompt_file_loads_for_regeneration_and_evaluation():
    """data/sample_prompts.jsonl (written by us) is a valid regen.input and evaluation dataset."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from deepspec.data.regenerate import make_jobs
    from deepspec.eval.datasets import load_prompt_texts

    path = Path(__file__).resolve().parents[1] / "data" / "sample_prompts.jsonl"
    stats = LoadStats()
    records = load_conversations(str(path), need_assistant=False, stats=stats)
    assert len(records) == stats.read == stats.kept == 20 and stats.num_skipped == 0
    assert [r["id"] for r in records] == [f"sample-{i:03d}" for i in range(1, 21)]
    assert not any(m["role"] == "assistant" for r in records for m in r["messages"])  # prompts only
    jobs = make_jobs(records, max_turns=0)
    assert all(j.users and all(u.strip() for u in j.users) for j in jobs)
    assert sum(bool(j.system) for j in jobs) == 2 and sum(len(j.users) == 2 for j in jobs) == 2
    cfg = OmegaConf.create({"eval": {"prompt_column": "messages"}})
    texts = load_prompt_texts(str(path), cfg)
    assert texts == [j.users[0] for j in jobs]  # the first user turn, also after a system message


def test_non_utf8_bytes_name_file_and_line_and_skip_applies(tmp_path):
    good = {"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    p = tmp_path / "bad.jsonl"
    p.write_bytes(
        (json.dumps(good) + "\n").encode()
        + b'{"id": "b", "messages": [{"role": "user", "content": "caf\xe9"}]}\n'
        + (json.dumps({**good, "id": "c"}) + "\n").encode()
    )
    with pytest.raises(
        DataError, match=r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column \d+\).*on_error=skip"
    ):
        load_conversations(str(p))
    stats = LoadStats()
    recs = load_conversations(str(p), on_error="skip", stats=stats)
    assert [r["id"] for r in recs] == ["a", "c"] and stats.skipped == {"not_utf8": 1}
    doc = tmp_path / "doc.json"  # one JSON document: named, with the line of the bad byte
    doc.write_bytes(b'[\n {"id": "a",\n  "messages": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=r"doc\.json:3: not valid UTF-8 \(byte 0xe9\)"):
        load_conversations(str(doc), on_error="skip")
