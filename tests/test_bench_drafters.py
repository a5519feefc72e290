"""scripts/bench_drafters.py over seeds: plan, resume, intervals and verdicts, on stand-in run folders
(no training)."""

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deepspec.eval import intervals
from deepspec.eval.datasets import heldout_eval_records

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_drafters", ROOT / "scripts" / "bench_drafters.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

PROMPTS = 8
# name: chance each slot is accepted given the previous one was, per temperature
ACCEPT = {
    "DSpark-2L": {0.0: 0.7, 1.0: 0.6},
    "DFlash-2L": {0.0: 0.3, 1.0: 0.3},
    "DFlash-5L": {0.0: 0.3, 1.0: 0.3},  # the same drafter in effect: a difference is noise
    "EAGLE-3-1L": {0.0: 0.3, 1.0: 0.85},  # worse than DSpark at T=0, better at T=1
    "DSpark-2L-d1024": {0.0: 0.7, 1.0: 0.6},  # pruning costs nothing (the same rounds as DSpark-2L)
    "DSpark-2L-d512": {0.0: 0.3, 1.0: 0.3},  # pruning costs a lot
}


def write_run(d: Path, name: str, gamma: int, seed: int) -> None:
    """A finished run folder as deepspec/train.py leaves it, with rounds drawn from ACCEPT[name]."""
    d.mkdir(parents=True, exist_ok=True)
    same_as = "DSpark-2L" if name == "DSpark-2L-d1024" else name
    rng = np.random.default_rng([seed, gamma, sum(map(ord, same_as))])
    temps, records = {}, []
    for temp, p in ACCEPT[name].items():
        rounds = []
        for prompt in range(PROMPTS):
            for _ in range(int(rng.integers(4, 9))):
                acc = 0
                while acc < gamma and rng.random() < p:
                    acc += 1
                rounds.append(acc)
                records.append({"temperature": temp, "prompt": prompt, "verified": gamma, "accepted": acc})
        temps[str(temp)] = {
            "rounds": len(rounds),
            "proposed": gamma * len(rounds),
            "accepted": sum(rounds),
            "tau": 1 + sum(rounds) / len(rounds),
            "num_prompts": PROMPTS,
            "draft_time_s": 0.002 * len(rounds),
            "identical_outputs": PROMPTS if temp == 0.0 else None,
            "scheduler": {"levels": []},
        }
    (d / "eval.json").write_text(
        json.dumps({"block_size": gamma, "max_new_tokens": 96, "num_prompts": PROMPTS, "temperatures": temps})
    )
    (d / "train_summary.json").write_text(json.dumps({"train_steps": 300, "train_time_s": 100.0 + seed}))
    (d / "run_info.json").write_text(
        json.dumps({"trainable_params": 1000, "drafter": {"target_layer_ids": [1]}})
    )
    (d / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


ARGV = [
    "--seeds",
    "3",
    "--gammas",
    "7,15",
    "--runs",
    "DSpark-2L,DFlash-2L,DFlash-5L,EAGLE-3-1L,DSpark-2L-d1024,DSpark-2L-d512",
    "--sweep-runs",
    "DSpark-2L,DFlash-2L",
    "--prompts",
    str(PROMPTS),
    "--reuse",
]


@pytest.fixture
def finished(tmp_path, monkeypatch):
    """Every planned run already finished: the benchmark must only read them."""
    argv = ARGV + ["--out", str(tmp_path)]
    for seed, gamma, name, d, _ in bench.plan(bench.parse(argv)):
        write_run(d, name, gamma, seed)

    def no_training(*a, **k):
        raise AssertionError(f"a finished run was trained again: {a}")

    monkeypatch.setattr(subprocess, "run", no_training)
    return argv, tmp_path


def test_plan_varies_training_seed_and_prompt_sample_per_seed(tmp_path):
    jobs = bench.plan(bench.parse(ARGV + ["--out", str(tmp_path)]))
    # γ=7: 6 drafters, γ=15: the 2 sweep drafters, for each of 3 seeds
    assert len(jobs) == 3 * (6 + 2)
    by_key = {(s, g, n): (d, o) for s, g, n, d, o in jobs}
    d, o = by_key[(2, 15, "DFlash-2L")]
    assert d == tmp_path / "seed2" / "gamma15" / "DFlash-2L"
    for want in ("model=dflash", "model.num_layers=2", "model.block_size=15", "train.seed=2", "eval.seed=2"):
        assert want in o
    assert "eval.sample_heldout=true" in o and f"eval.num_prompts={PROMPTS}" in o
    _, o = by_key[(1, 7, "DSpark-2L-d512")]
    assert "model=dspark" in o and "model.draft_vocab_size=512" in o and "train.seed=1" in o
    assert not any(n.endswith("-d512") for s, g, n in by_key if g == 15)


def test_unknown_drafter_name_is_refused():
    with pytest.raises(SystemExit, match="unknown drafter 'DSpark-9L'"):
        bench.parse(["--runs", "DSpark-2L,DSpark-9L"])


def test_intervals_and_verdicts_from_run_folders(finished):
    argv, out = finished
    rep = bench.main(argv)
    runs = {}
    for _seed, gamma, name, d, _ in bench.plan(bench.parse(argv)):
        runs.setdefault((gamma, name), []).append(
            [json.loads(x) for x in (d / "rounds.jsonl").read_text().splitlines()]
        )

    def counts(gamma, name, temp):
        return [intervals.prompt_counts(r, temp) for r in runs[(gamma, name)]]

    comps = {(c["gamma"], c["temperature"], c["a"], c["b"]): c for c in rep["comparisons"]}
    # the interval is the paired bootstrap over the 3 seeds' per-prompt counts
    c = comps[(7, 0.0, "DSpark-2L", "DFlash-2L")]
    want = intervals.tau_ratio_interval(counts(7, "DSpark-2L", 0.0), counts(7, "DFlash-2L", 0.0))
    assert c["ratio"] == want.to_dict() and want.seeds == 3 and want.prompts == PROMPTS
    assert want.low > 1 and c["verdict"] == "DSpark-2L beats DFlash-2L"
    noise = comps[(7, 1.0, "DFlash-5L", "DFlash-2L")]
    assert noise["ratio"]["low"] < 1 < noise["ratio"]["high"] and noise["verdict"] == "within noise"
    assert comps[(7, 0.0, "DSpark-2L", "EAGLE-3-1L")]["verdict"] == "DSpark-2L beats EAGLE-3-1L"
    assert comps[(7, 1.0, "DSpark-2L", "EAGLE-3-1L")]["verdict"] == "EAGLE-3-1L beats DSpark-2L"
    assert comps[(15, 1.0, "DSpark-2L", "DFlash-2L")]["verdict"] == "DSpark-2L beats DFlash-2L"
    # pruned runs are compared with their full-vocabulary run only
    assert (7, 0.0, "DSpark-2L-d512", "DFlash-2L") not in comps
    same = comps[(7, 0.0, "DSpark-2L-d1024", "DSpark-2L")]
    assert same["kind"] == "pruning" and same["verdict"] == "within noise"
    assert same["ratio"]["low"] == same["ratio"]["high"] == 1.0 and same["goal"].startswith("met")
    lost = comps[(7, 1.0, "DSpark-2L-d512", "DSpark-2L")]
    assert lost["verdict"] == "DSpark-2L beats DSpark-2L-d512" and lost["goal"].startswith("missed")
    assert lost["cost"]["value"] == pytest.approx(1 - lost["ratio"]["value"])
    assert lost["cost"]["low"] == pytest.approx(1 - lost["ratio"]["high"])
    # each τ with its interval, and the sample it came from
    md = (out / "bench_drafters.md").read_text()
    tau = intervals.tau_interval(counts(15, "DFlash-2L", 1.0))
    assert f"| 15 | DFlash-2L | 1 | {tau.fmt()} | 3 × {PROMPTS} |" in md
    assert "| 7 | 0 | DSpark-2L / DFlash-2L |" in md and "DSpark-2L beats DFlash-2L" in md
    assert "| 7 | 0 | DSpark-2L-d512 |" in md and "missed: costs" in md
    assert f"{3 * PROMPTS}/{3 * PROMPTS}" in md  # T=0 identity summed over seeds
    saved = json.loads((out / "bench_drafters.json").read_text())
    assert saved["comparisons"] == rep["comparisons"] and saved["seeds"] == 3
    assert saved["command"].endswith("--reuse --out " + str(out))


def test_gain_growth_and_slot_sample_sizes(finished):
    argv, out = finished
    rep = bench.main(argv)
    g = {x["temperature"]: x for x in rep["gain_growth"]}
    assert set(g) == {0.0, 1.0} and g[0.0]["gammas"] == [7, 15]
    r = g[0.0]["ratio"]
    assert r["low"] <= r["value"] <= r["high"] and r["seeds"] == 3
    assert g[0.0]["verdict"] in (
        "within noise",
        "the gain grows from γ=7 to γ=15",
        "the gain shrinks from γ=7 to γ=15",
    )
    # slot 1's sample is every round of every seed; later slots fewer
    runs = rep["runs"]["7"]["DFlash-2L"]
    total = sum(runs[s]["temperatures"]["0.0"]["rounds"] for s in runs)
    md = (out / "bench_drafters.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| 7 | DFlash-2L | 0 |") and "…" in x)
    assert f"| {total} … " in line
    reached = [sum(x) for x in zip(*(runs[s]["temperatures"]["0.0"]["slot_reached"] for s in runs))]
    assert reached[0] == total and reached[-1] < reached[1] < total


def test_reuse_keeps_finished_runs_and_trains_the_missing_one(tmp_path, monkeypatch):
    argv = [
        "--seeds",
        "2",
        "--gammas",
        "7",
        "--runs",
        "DSpark-2L,DFlash-2L",
        "--reuse",
        "--out",
        str(tmp_path),
    ]
    jobs = bench.plan(bench.parse(argv))
    for seed, gamma, name, d, _ in jobs[:-1]:
        write_run(d, name, gamma, seed)
    seed, gamma, name, missing, _ = jobs[-1]
    calls = []

    def fake_train(cmd, **kw):
        calls.append(cmd)
        write_run(missing, name, gamma, seed)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_train)
    rep = bench.main(argv)
    assert len(calls) == 1 and f"train.output_dir={missing}" in calls[0] and "train.seed=1" in calls[0]
    assert rep["comparisons"][0]["ratio"]["seeds"] == 2
    # without --reuse every run is trained again
    calls.clear()
    bench.main([a for a in argv if a != "--reuse"])
    assert len(calls) == 4


def test_failed_run_names_its_log(tmp_path, monkeypatch):
    def fail(cmd, stdout=None, **kw):
        stdout.write("boom: bad override\n")
        return subprocess.CompletedProcess(cmd, 2)

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(
        RuntimeError, match=r"(?s)run DSpark-2L γ=7 seed 0 failed \(exit 2\).*bench.log.*boom"
    ):
        bench.main(["--seeds", "1", "--gammas", "7", "--runs", "DSpark-2L", "--out", str(tmp_path)])


def test_heldout_sample_is_seeded_and_first_records_by_default():
    class E:
        num_prompts, seed, sample_heldout = 4, 0, False

    recs = [{"id": i} for i in range(40)]
    assert heldout_eval_records(recs, E) == recs[:4]
    E.sample_heldout = True
    a = heldout_eval_records(recs, E)
    assert len(a) == 4 and a == heldout_eval_records(recs, E)  # same seed, same prompts
    E.seed = 1
    b = heldout_eval_records(recs, E)
    assert len(b) == 4 and b != a
    assert [r["id"] for r in b] == sorted(r["id"] for r in b)


def test_report_only_tables_the_finished_runs_and_lists_the_rest(tmp_path, monkeypatch):
    argv = [
        "--seeds",
        "2",
        "--gammas",
        "7",
        "--runs",
        "DSpark-2L,DFlash-2L,EAGLE-3-1L",
        "--out",
        str(tmp_path),
    ]
    jobs = bench.plan(bench.parse(argv))
    for seed, gamma, name, d, _ in jobs:
        if not (seed == 1 and name == "EAGLE-3-1L"):
            write_run(d, name, gamma, seed)
    # a run resumed only to evaluate again records no training time
    (jobs[0][3] / "train_summary.json").write_text(json.dumps({"train_steps": 300, "train_time_s": None}))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("--report-only trained a run"))
    rep = bench.main(argv + ["--report-only"])
    assert rep["missing_runs"] == ["EAGLE-3-1L γ=7 seed 1"]
    comps = {(c["a"], c["b"], c["temperature"]): c for c in rep["comparisons"]}
    assert comps[("DSpark-2L", "DFlash-2L", 0.0)]["ratio"]["seeds"] == 2
    assert comps[("DSpark-2L", "EAGLE-3-1L", 0.0)]["ratio"]["seeds"] == 1  # only the seed both ran
    md = (tmp_path / "bench_drafters.md").read_text()
    assert "| 7 | EAGLE-3-1L | 1 |" in md and f"| 1 × {PROMPTS} |" in md
    assert "Not run, so absent from the tables: EAGLE-3-1L γ=7 seed 1." in md
    dspark = next(x for x in md.splitlines() if x.startswith("| 7 | DSpark-2L | 0 |"))
    assert dspark.endswith("| 1,000 | 101 |")  # the mean of the one recorded training time (seed 1)
    with pytest.raises(SystemExit, match="no finished run"):
        bench.main(["--seeds", "1", "--out", str(tmp_path / "empty"), "--report-only"])
