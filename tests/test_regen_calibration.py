"""scripts/regen_calibration.py: the prompt sample it regenerates, and its table from evaluation folders."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from deepspec.config import TinyTargetConfig

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("regen_calibration", ROOT / "scripts" / "regen_calibration.py")
rc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(30):
        body = "".join(
            f"def f{i}_{k}(a, b):\n    total = a * {rng.randint(2, 9)} + b\n    total = total - a + {k}\n    return total\n\n"
            for k in range(4)
        )
        (src / f"m{i:02d}.py").write_text(body)
    return TinyTargetConfig(corpus_dir=str(src), corpus_glob="*.py", heldout_fraction=0.2)


def test_prompts_are_a_seeded_sample_of_the_training_split(corpus, tmp_path):
    from deepspec.data.tiny_chat import tiny_chat_splits

    splits = tiny_chat_splits(corpus)
    train_ids = {r["id"] for r in splits["train"]}
    heldout_ids = {r["id"] for r in splits["heldout"]}
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    train = splits["train"]
    assert rc.write_prompts(train, 20, 0, a) == 20
    rc.write_prompts(train, 20, 0, b, id_suffix="@t1")  # the same list again: the same sample
    rc.write_prompts(train, 20, 1, c)
    ra = [json.loads(x) for x in a.read_text().splitlines()]
    rb = [json.loads(x) for x in b.read_text().splitlines()]
    ids = [r["id"] for r in ra]
    assert len(set(ids)) == 20 and set(ids) <= train_ids and not set(ids) & heldout_ids
    assert [r["id"] for r in rb] == [i + "@t1" for i in ids]  # same prompts, ids that cannot collide
    assert [r["messages"] for r in rb] == [r["messages"] for r in ra]
    assert all(r["messages"][0]["role"] == "user" for r in ra)
    assert ids != [json.loads(x)["id"] for x in c.read_text().splitlines()]  # the seed draws the sample
    assert rc.write_prompts(train, 10**6, 0, a) == len(train_ids)  # asking for more takes them all


def _slot(ece, auc, observed=0.5):
    return {"ece": ece, "ece_floor": 0.01, "auc": auc, "observed": observed}


def _eval_dir(root: Path, name: str, temp: str, per_prompt, ece, auc):
    """An evaluation folder as evaluate.py writes it: eval.json and one rounds.jsonl record per round."""
    d = root / f"eval_{name}_T{temp}"
    d.mkdir(parents=True)
    rounds = [
        {"temperature": float(temp), "prompt": p, "accepted": acc}
        for p, accs in enumerate(per_prompt)
        for acc in accs
    ]
    n, a = len(rounds), sum(r["accepted"] for r in rounds)
    conf = {
        "event": "greedy" if temp == "0.0" else "sampling",
        "evaluation_rounds": n // 2,
        "sts_temperatures": [1.0, 1.0],
        "before": [_slot(e + 0.01, x) for e, x in zip(ece, auc)],
        "after": [_slot(e, x) for e, x in zip(ece, auc)],
    }
    m = {"tau": 1 + a / n, "num_prompts": len(per_prompt), "confidence": conf if ece else None}
    (d / "eval.json").write_text(json.dumps({"datasets": {"tiny": {"temperatures": {temp: m}}}}))
    (d / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))


def test_report_pairs_each_drafter_with_the_corpus_one_and_checks_the_goal(tmp_path):
    corpus_counts = [[1, 1], [2, 0], [1, 2]]  # accepted drafts per round, per prompt
    regen_counts = [[2, 2], [3, 1], [2, 3]]
    _eval_dir(tmp_path, "corpus", "0.0", corpus_counts, ece=[0.10, 0.02], auc=[0.8, 0.7])
    _eval_dir(tmp_path, "regen-t0", "0.0", regen_counts, ece=[0.012, 0.009], auc=[0.9, 0.61])
    _eval_dir(tmp_path, "regen-t0", "1.0", regen_counts, ece=[0.012, 0.009], auc=[0.9, 0.6])
    result = rc.report(tmp_path)
    rows = {(r["drafter"], r["temperature"]): r for r in result["rows"]}
    assert set(rows) == {("corpus", 0.0), ("regen-t0", 0.0), ("regen-t0", 1.0)}
    corpus, regen = rows[("corpus", 0.0)], rows[("regen-t0", 0.0)]
    assert corpus["tau_interval"]["value"] == pytest.approx(1 + 7 / 6)
    assert regen["tau_interval"]["value"] == pytest.approx(1 + 13 / 6)
    ratio = regen["tau_over_corpus"]
    assert ratio["value"] == pytest.approx((1 + 13 / 6) / (1 + 7 / 6))
    assert ratio["low"] <= ratio["value"] <= ratio["high"] and ratio["prompts"] == 3
    assert corpus["tau_over_corpus"] is None
    assert rows[("regen-t0", 1.0)]["tau_over_corpus"] is None  # no corpus run at T = 1 to pair with
    assert regen["goal"] == "met at every slot"
    assert corpus["goal"] == "ECE misses at slot 1: 10.00 %, 2: 2.00 %"
    assert rows[("regen-t0", 1.0)]["goal"] == "AUC misses at slot 2: 0.600"  # the goal is AUC > 0.6
    assert result["versus"] == []  # one drafter only
    md = (tmp_path / "regen_calibration.md").read_text()
    assert "| regen-t0 | 0 | 3.167 [" in md and "| 1.2 0.9 |" in md
    assert json.loads((tmp_path / "regen_calibration.json").read_text())["rows"] == result["rows"]


def test_report_needs_the_corpus_drafter(tmp_path):
    _eval_dir(tmp_path, "regen-mix", "1.0", [[1], [0]], ece=[0.01], auc=[0.7])
    with pytest.raises(SystemExit, match="no evaluated corpus drafter"):
        rc.report(tmp_path)


def test_stages_run_in_order_and_a_rerun_skips_what_is_done(corpus, tmp_path, monkeypatch):
    """The commands each stage runs (stand-ins write each stage's output), and the resume."""
    from types import SimpleNamespace

    out = tmp_path / "out"
    ran = []

    def fake_run(cmd, log, threads):
        ran.append(cmd[1:])
        args = dict(a.split("=", 1) for a in cmd[2:] if "=" in a)
        if cmd[1].endswith("regenerate.py"):
            Path(args["regen.output"].replace(".jsonl", ".meta.json")).write_text("{}")
        elif cmd[1].endswith("train.py"):
            Path(args["train.output_dir"]).mkdir(parents=True)
            (Path(args["train.output_dir"]) / "train_summary.json").write_text("{}")
        else:
            Path(args["eval.output_dir"]).mkdir(parents=True)
            (Path(args["eval.output_dir"]) / "eval.json").write_text("{}")

    monkeypatch.setattr(rc, "_run", fake_run)
    monkeypatch.setattr(
        rc, "compose_config", lambda overrides: SimpleNamespace(target=SimpleNamespace(tiny=corpus))
    )
    ns = SimpleNamespace(
        out=str(out), prompts=12, eval_prompts=5, seed=3, max_new_tokens=64, regen_batch=4, threads=1
    )
    ns.data_list, ns.model_list = list(rc.DATA), ["DSpark-2L"]
    rc.run_stages(ns, ["recipe=tiny"])
    scripts = [Path(c[0]).name for c in ran]
    assert scripts == ["regenerate.py"] * 2 + ["train.py", "evaluate.py", "evaluate.py"] * 4
    regen_t1 = ran[1]
    assert "regen.sampling.temperature=1.0" in regen_t1 and "regen.sampling.top_k=0" in regen_t1
    assert "regen.sampling.temperature=0" in ran[0] and "regen.batch_size=4" in ran[0]
    mix = [c for c in ran if f"train.output_dir={out / 'regen-mix'}" in c][0]
    assert f"data.path='{out / 'regen_t0.jsonl'},{out / 'regen_t1.jsonl'}'" in mix  # one string for Hydra
    corpus_train = [c for c in ran if f"train.output_dir={out / 'corpus'}" in c][0]
    assert not any(a.startswith("data.") for a in corpus_train) and "train.seed=3" in corpus_train
    evals = [c for c in ran if Path(c[0]).name == "evaluate.py"]
    assert {a for c in evals for a in c if a.startswith("eval.temperatures=")} == {
        "eval.temperatures=[0.0]",
        "eval.temperatures=[1.0]",
    }
    t0, t1 = (
        [json.loads(x) for x in (out / f"prompts_{k}.jsonl").read_text().splitlines()] for k in ("t0", "t1")
    )
    assert len(t1) == 12 and [r["id"] + "@t1" for r in t0] == [r["id"] for r in t1]  # one sample, both files
    ran.clear()
    rc.run_stages(ns, ["recipe=tiny"])
    assert ran == []  # everything was there
    ns.data_list, ns.model_list = ["regen-mix"], ["EAGLE-3-1L"]
    rc.run_stages(ns, ["recipe=tiny"])
    assert [Path(c[0]).name for c in ran] == ["train.py", "evaluate.py", "evaluate.py"]
    assert "model=eagle3" in ran[0] and "model.num_layers=1" in ran[0]
    assert f"train.output_dir={out / 'regen-mix+EAGLE-3-1L'}" in ran[0]
    assert f"eval.drafter={out / 'regen-mix+EAGLE-3-1L'}" in ran[1]


def test_report_compares_the_recipe_drafter_with_others_on_the_same_data(tmp_path):
    _eval_dir(tmp_path, "corpus", "0.0", [[1, 1], [2, 0], [1, 2]], ece=[0.01], auc=[0.8])
    _eval_dir(tmp_path, "corpus+EAGLE-3-1L", "0.0", [[2, 2], [3, 1], [2, 3]], ece=[0.01], auc=[0.8])
    _eval_dir(tmp_path, "regen-mix+DFlash-2L", "0.0", [[0, 0], [1, 0], [0, 1]], ece=[], auc=[])
    result = rc.report(tmp_path)
    (v,) = result["versus"]  # DFlash-2L has no DSpark-2L run on its data to pair with
    assert (v["data"], v["temperature"], v["pair"]) == ("corpus", 0.0, "DSpark-2L / EAGLE-3-1L")
    assert v["ratio"]["value"] == pytest.approx((1 + 7 / 6) / (1 + 13 / 6))
    rows = {r["drafter"]: r for r in result["rows"]}
    assert rows["corpus+EAGLE-3-1L"]["tau_over_corpus"] is None  # its own data is the corpus
    assert rows["regen-mix+DFlash-2L"]["tau_over_corpus"] is None  # no corpus-trained DFlash-2L
    md = (tmp_path / "regen_calibration.md").read_text()
    assert "| corpus | 0 | DSpark-2L / EAGLE-3-1L |" in md
    assert rows["regen-mix+DFlash-2L"]["goal"] == "no confidence head"  # DFlash has none
    assert "| regen-mix+DFlash-2L | 0 | 1.333 [" in md and "| - | - | - | no confidence head |" in md
