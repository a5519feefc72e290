"""deepspec/evaluate.py end to end, τ consistency, input errors, and T=1 losslessness of scheduled cuts."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_spec_decode import ALPHA, g_test_pvalue, make_target, sample_counts, tiny_vocab_setup  # noqa: F401
from tiny_models import target_config, word_tokenizer

from deepspec.config import DeepSpecConfig, DrafterConfig
from deepspec.eval import spec_decode
from deepspec.eval.calibration import from_rounds, split_by_prompt
from deepspec.eval.scheduler import SPSCurve, causal_verify_len
from deepspec.eval.spec_decode import RoundRecord, verify
from deepspec.exporting.native import load_native, save_native
from deepspec.models.config import resolve_drafter_config
from deepspec.models.parallel import ParallelDrafter


def save_drafter(target, path, mask="auto", seed=1, hidden_config=None, markov_rank=8):
    tc = (hidden_config or target.config).to_dict()
    dc = resolve_drafter_config(
        DrafterConfig(
            num_layers=1,
            block_size=3,
            target_layer_ids=[0, 1, 2],
            markov_rank=markov_rank,
            mask_token_id=mask,
        ),
        tc,
        mask_token_id=1,
    )
    d = ParallelDrafter(dc)
    d.init_weights(std=0.1, seed=seed)
    if hidden_config is None:
        d.load_target_head(target.embed_tokens.weight, target.lm_head.weight)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d.markov_head.markov_w2.weight.copy_(
            torch.randn(d.markov_head.markov_w2.weight.shape, generator=g) * 0.3
        )
    save_native(d, path)
    return path


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaljob")
    target = make_target(vocab=32)
    target.model.save_pretrained(root / "target")
    word_tokenizer().save_pretrained(root / "target")
    save_drafter(target, root / "run" / "drafter")
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(10):
            turn = " ".join(f"w{rng.randrange(25)}" for _ in range(rng.randrange(1, 6)))
            f.write(json.dumps({"turns": [turn, "w1 w2"], "category": "x"}) + "\n")
    return root, target


def job_config(root, **eval_overrides):
    cfg = OmegaConf.structured(DeepSpecConfig)
    e = dict(
        drafter=str(root / "run"),
        datasets=[str(root / "prompts.jsonl")],
        num_prompts=0,
        max_new_tokens=16,
        temperatures=[0.0, 1.0],
        concurrency=[1, 4],
        profile_repeats=1,
        profile_context=8,
        progress_bar=False,
        output_dir=str(root / "out"),
    )
    e.update(eval_overrides)
    return OmegaConf.merge(cfg, {"target": {"name_or_path": str(root / "target")}, "eval": e})


def _tau_from_masks(rows):
    # τ = accepted + 1 per round; "accepted" read back from the per-slot accept events alone
    return float(
        np.mean(
            [1 + sum(int(all(r["accept_mask"][: k + 1])) for k in range(len(r["accept_mask"]))) for r in rows]
        )
    )


def test_evaluate_job_end_to_end(setup_dirs):
    from deepspec.eval.pipeline import run_evaluation

    root, _ = setup_dirs
    rep = run_evaluation(job_config(root, save_sts=True))  # every decoded temperature's fit is stored
    out = root / "out"
    on_disk = json.loads((out / "eval.json").read_text())
    for key in (
        "block_size",
        "target_layer_ids",
        "markov_rank",
        "markov_head_type",
        "max_new_tokens",
        "seed",
        "num_prompts",
        "temperatures",
        "datasets",
        "sps_profile",
        "sts_saved",
    ):
        assert key in on_disk
    name = "prompts.jsonl"  # a local file is labelled by its base name
    assert list(on_disk["datasets"]) == [name] and on_disk["num_prompts"] == 10
    t0, t1 = on_disk["temperatures"]["0.0"], on_disk["temperatures"]["1.0"]
    assert t0["identical_outputs"] == 10  # T=0 output = the target's greedy output, every prompt
    for s in (t0, t1):
        assert s["confidence"]["sts_temperatures"] and len(s["confidence"]["before"]) == 3
        assert [r["concurrency"] for r in s["scheduler"]["levels"]] == [1, 4]
        assert (
            len(s["threshold_sweep"]) == 20 and s["draft_ms_per_round"] > 0 and s["verify_ms_per_round"] > 0
        )
    for png in ("acceptance", "reliability", "threshold", "throughput"):
        assert list(out.glob(f"{png}_*.png")), png
    # Each temperature's confidences predict its own event: the greedy output at T = 0.
    assert (t0["confidence_event"], t1["confidence_event"]) == ("greedy", "sampling")
    assert t0["confidence"]["event"] == "greedy" and "stored" not in t0["confidence"]  # nothing stored yet
    # STS stored per decoding temperature in the drafter folder, read back by the loader
    back = load_native(root / "run" / "drafter").config
    fits = {"0.0": t0["confidence"]["sts_temperatures"], "1.0": t1["confidence"]["sts_temperatures"]}
    assert back.sts_by_temperature == fits == rep["sts_saved"]["sts_by_temperature"]
    assert back.sts_for(0.0) == fits["0.0"] and back.sts_for(1.0) == fits["1.0"]

    # τ consistency: the reported τ is the analytic expectation from the recorded acceptance events
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    for key, s in on_disk["temperatures"].items():
        mine = [r for r in rows if r["temperature"] == float(key)]
        assert len(mine) == s["rounds"]
        assert s["tau"] == pytest.approx(_tau_from_masks(mine), abs=1e-12)
        assert s["tau"] == pytest.approx(1 + sum(s["survival"]), abs=1e-12)  # E[acc] = Σ_k P(acc >= k)
        assert s["survival"] == pytest.approx(np.cumprod(s["conditional_acceptance"]).tolist(), abs=1e-12)
        assert s["spec_new_tokens"] == s["num_prompts"] + sum(r["committed"] for r in mine)
        # the replay tools agree: on the held-out split, a zero threshold and the fixed policy realise τ
        by_prompt = [
            [
                RoundRecord(
                    3,
                    r["verified"],
                    r["accepted"],
                    r["accept_mask"],
                    confidence_logits=r["confidence_logits"],
                )
                for r in mine
                if r["prompt"] == i
            ]
            for i in range(s["num_prompts"])
        ]
        _, test = split_by_prompt(from_rounds(by_prompt), 0.5, 0)
        tau_test = float(np.mean(test.accepted + 1))
        assert s["threshold_sweep"][0]["tokens_per_step"] == pytest.approx(tau_test)
        fixed = s["scheduler"]["levels"][0]["policies"]["fixed"]
        assert fixed["tokens_per_request_step"] == pytest.approx(tau_test)


def test_hydra_tree_composes():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from deepspec.config import register_configs
    from deepspec.entrypoint import CONFIG_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate", overrides=["eval.drafter=/x", "eval.temperatures=[0.5]", "eval.concurrency=[1,8]"]
        )
        assert (
            cfg.eval.drafter == "/x"
            and list(cfg.eval.temperatures) == [0.5]
            and cfg.target.name_or_path == "tiny"
        )
        with pytest.raises(ConfigCompositionException):
            compose("evaluate", overrides=["eval.drafterr=/x"])


# ---------------------------------------------------------------- bad input


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if weights are loaded or anything is decoded."""
    import deepspec.eval.runner as runner
    from deepspec.target.adapter import TargetModel

    def boom(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(runner, "generate", boom)
    monkeypatch.setattr(TargetModel, "from_pretrained", classmethod(boom))


def test_mismatched_drafter_fails_before_loading(setup_dirs, tmp_path, no_work):
    from deepspec.eval.pipeline import run_evaluation

    root, target = setup_dirs
    base = {k: v for k, v in target.config.to_dict().items() if k != "layer_types"}
    cases = {
        "vocab_size": target_config("qwen3", **{**base, "vocab_size": 40}),
        "hidden size": target_config("qwen3", **{**base, "hidden_size": 64}),
        "num_target_layers": target_config("qwen3", **{**base, "num_hidden_layers": 6}),
    }
    for msg, other in cases.items():
        d = save_drafter(target, tmp_path / msg.replace(" ", "_"), hidden_config=other)
        with pytest.raises(ValueError, match=msg):
            run_evaluation(job_config(root, drafter=str(d)))
    # layer ids the target does not have, and mask ids that are not the target's mask
    d = save_drafter(target, tmp_path / "ids")
    cfg = json.loads((d / "config.json").read_text())
    for key, value, msg in (
        ("target_layer_ids", [0, 2, 5], "out of range"),
        ("mask_token_id", 20, "ordinary token|mask token is 1"),
        ("mask_token_id", 2, "mask token is 1"),
    ):
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=msg):
            run_evaluation(job_config(root, drafter=str(d)))


def test_bad_dataset_and_temperature(setup_dirs, tmp_path, no_work):
    from deepspec.eval.pipeline import run_evaluation

    root, _ = setup_dirs
    bad = tmp_path / "questions.jsonl"
    bad.write_text(json.dumps({"question": "w1 w2"}) + "\n")
    with pytest.raises(ValueError, match=r"questions\.jsonl has no key 'turns'"):
        run_evaluation(job_config(root, datasets=[str(bad)]))
    empty = tmp_path / "empty_turn.jsonl"
    empty.write_text(json.dumps({"turns": []}) + "\n")
    with pytest.raises(ValueError, match=r"empty_turn\.jsonl, record 0, key 'turns'"):
        run_evaluation(job_config(root, datasets=[str(empty)]))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_evaluation(job_config(root, datasets=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(ValueError, match="temperatures"):
        run_evaluation(job_config(root, temperatures=[1.0, -0.5]))
    with pytest.raises(FileNotFoundError, match="drafter"):
        run_evaluation(job_config(root, drafter=str(tmp_path)))


def test_dataset_labels(tmp_path):
    from deepspec.eval.datasets import dataset_labels

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "p.jsonl").write_text("")
    (tmp_path / "q.jsonl").write_text("")
    names = [
        "gsm8k",
        str(tmp_path / "q.jsonl"),
        str(tmp_path / "a" / "p.jsonl"),
        str(tmp_path / "b" / "p.jsonl"),
    ]
    assert dataset_labels(names) == {
        names[0]: "gsm8k",
        names[1]: "q.jsonl",
        names[2]: names[2],
        names[3]: names[3],
    }


def test_hub_dataset_mapping(monkeypatch):
    import datasets

    from deepspec.eval.datasets import load_prompt_texts, select

    calls = []

    def fake_load(repo, config=None, split=None, **kw):
        calls.append((repo, config, split))
        rows = {
            "openai/gsm8k": {"question": ["q1", "q2"]},
            "HuggingFaceH4/mt_bench_prompts": {"prompt": [["turn 1", "turn 2"]]},
            "me/chats": {
                "messages": [[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]]
            },
        }[repo]
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = OmegaConf.structured(DeepSpecConfig)
    assert load_prompt_texts("gsm8k", cfg) == ["q1", "q2"] and calls[-1] == ("openai/gsm8k", "main", "test")
    assert load_prompt_texts("mt-bench", cfg) == ["turn 1"]  # first user turn only
    cfg.eval.prompt_column, cfg.eval.dataset_split = "messages", "train"
    assert load_prompt_texts("me/chats", cfg) == ["hi"] and calls[-1] == ("me/chats", None, "train")
    texts = [str(i) for i in range(50)]
    assert select(texts, 10, 0) == select(texts, 10, 0) and len(set(select(texts, 10, 0))) == 10
    assert select(texts, 0, 0) == texts


# ---------------------------------------------------------------- T=1 lossless with scheduled cuts

# A single request on a device where a step of B tokens takes 1 + 0.3·(B−1) units: with this drafter's
# confidences (a_1 ≈ .13–.60, a_2 ≈ .07–.39) the scheduler cuts at 0, 1 and 2 drafts.
SPS_TEST = SPSCurve([1, 2, 3], [1.0, 1 / 1.3, 1 / 1.6])


@pytest.mark.slow
def test_t1_lossless_with_causal_scheduler(tiny_vocab_setup):  # noqa: F811
    target, drafter, prompt, exact = tiny_vocab_setup
    counts, rounds = sample_counts(
        target, drafter, prompt, 3, 3000, seed=21, verify_len=causal_verify_len(SPS_TEST)
    )
    cuts = [r.verified for r in rounds]
    assert {0, 1, 2} <= set(cuts) and min(cuts.count(k) for k in (0, 1, 2)) > 0.05 * len(cuts)
    assert g_test_pvalue(counts, exact) > ALPHA


def _peeking_cut(draft_tokens, q_probs, p_probs, temperature, generator=None):
    """NON-causal admission: run the verification, see how many drafts survive, then send only those.

    It is what a scheduler would do if it could see the verification before choosing ℓ: the cut
    always lands exactly on the first rejection, so the next token comes from p instead of the
    residual max(p − q, 0) and rejected drafts come back too often.
    """
    n, _, _ = verify(draft_tokens, q_probs, p_probs, temperature, generator)
    return verify(draft_tokens[:n], q_probs[:n], p_probs[: n + 1], temperature, generator)


@pytest.mark.slow
def test_t1_noncausal_cut_is_detected(tiny_vocab_setup, monkeypatch):  # noqa: F811
    """The same test at the same sample size rejects a cut chosen after peeking at the verification
    (p-values 1e-19..1e-23 over seeds 22-24, against the 1e-3 threshold)."""
    target, drafter, prompt, exact = tiny_vocab_setup
    monkeypatch.setattr(spec_decode, "verify", _peeking_cut)
    counts, _ = sample_counts(target, drafter, prompt, 3, 3000, seed=22)
    assert g_test_pvalue(counts, exact) < ALPHA


def test_damaged_drafter_header_is_named(setup_dirs, tmp_path):
    """A damaged safetensors header (or config.json) of the drafter: an error naming the file, not a bare
    SafetensorError / JSONDecodeError."""
    import shutil

    from deepspec.eval.pipeline import run_evaluation
    from deepspec.exporting.io import ExportInputError

    root, _ = setup_dirs
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    weights = run / "drafter" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"  # inside the JSON header: same size, unreadable header
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportInputError, match=f"{weights}: not a readable safetensors file"):
        run_evaluation(job_config(root, drafter=str(run), output_dir=str(tmp_path / "out")))
    (run / "drafter" / "config.json").write_text('{"block_size": 7,')
    with pytest.raises(ExportInputError, match=r"drafter/config\.json: invalid JSON at line 1"):
        run_evaluation(job_config(root, drafter=str(run), output_dir=str(tmp_path / "out")))
