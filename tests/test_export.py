"""Export formats, the checker, bad inputs and the model card, on tiny random Qwen3 and Llama targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from export_fixtures import MASK, V, tiny_drafter, tiny_target
from safetensors.torch import load_file, save_file

from deepspec.exporting.check import check_export
from deepspec.exporting.formats import FormatError
from deepspec.exporting.io import ExportInputError
from deepspec.exporting.native import save_native
from deepspec.exporting.writer import drafter_outputs, export_drafter, load_export, resolve_checkpoint
from deepspec.models.parallel import ParallelDrafter

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["native", "speculators", "dflash"]


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """family -> (model, saved folder)."""
    out = {}
    for fam in ("qwen3", "llama"):
        t = tiny_target(fam)
        path = tmp_path_factory.mktemp(f"target-{fam}")
        t.save_pretrained(str(path))
        out[fam] = (t, path)
    return out


def _drafter_for(fmt, target):
    return tiny_drafter(target, kind="dflash" if fmt == "dflash" else "dspark")


def _bf16_twin(d, keep=()):
    """The drafter with its exported weights rounded through bf16: what a bf16 export must reproduce exactly.

    ``keep``: tensors not in the export (taken from the fp32 target when loading)."""
    twin = ParallelDrafter(d.config)
    twin.load_state_dict(
        {k: v if k in keep else v.to(torch.bfloat16).float() for k, v in d.state_dict().items()}
    )
    return twin.eval()


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(targets, family, fmt, dtype, tmp_path):
    target, tdir = targets[family]
    d = _drafter_for(fmt, target)
    out = export_drafter(d, tmp_path / "x", fmt, dtype)

    rep = check_export(out, target=tdir, reference=d)
    assert rep.ok, rep.render()
    alone = check_export(out, target=tdir)  # no reference: the probe stored with the export decides
    assert alone.ok and any("probe" in m for m in alone.passed), alone.render()

    emb, head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    loaded = load_export(out, target_embed=emb, target_lm_head=head)
    got, got_conf = drafter_outputs(loaded)
    keep = ("embed_tokens.weight", "lm_head.weight") if fmt == "dflash" else ()
    ref, ref_conf = drafter_outputs(d if dtype == "float32" else _bf16_twin(d, keep))
    assert torch.equal(got, ref), (got - ref).abs().max()
    if dtype == "bfloat16":  # and close to the fp32 original, within bf16 rounding
        orig, _ = drafter_outputs(d)
        assert (got - orig).abs().max() < 2e-2 * (1 + orig.abs().max())
    assert (got_conf is None) == (ref_conf is None) and (got_conf is None or torch.equal(got_conf, ref_conf))
    header = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in header.values()} == {getattr(torch, dtype)}
    assert ("embed_tokens.weight" in header) == (fmt != "dflash")


def test_format_configs_follow_one_description(targets, tmp_path):
    target, _ = targets["qwen3"]
    d = tiny_drafter(target)
    c = d.config
    spec = json.loads((export_drafter(d, tmp_path / "s", "speculators") / "config.json").read_text())
    assert spec["speculators_model_type"] == "dspark"
    assert spec["aux_hidden_state_layer_ids"] == [i + 1 for i in c.target_layer_ids]
    assert spec["sample_from_anchor"] is True
    assert spec["speculators_config"]["proposal_methods"] == [
        {"proposal_type": "greedy", "speculative_tokens": c.block_size}
    ]
    assert spec["speculators_config"]["default_proposal_method"] == "greedy"
    assert spec["speculators_config"]["verifier"]["architectures"] == ["Qwen3ForCausalLM"]
    layer = spec["transformer_layer_config"]
    assert (
        layer["model_type"] == "qwen3" and layer["num_hidden_layers"] == 2 and len(layer["layer_types"]) == 2
    )
    assert (spec["mask_token_id"], spec["block_size"], spec["draft_vocab_size"]) == (MASK, c.block_size, V)
    assert (spec["markov_rank"], spec["markov_head_type"], spec["enable_confidence_head"]) == (
        16,
        "vanilla",
        True,
    )

    native = json.loads((export_drafter(d, tmp_path / "n", "native") / "config.json").read_text())
    assert (
        native["architectures"] == ["Qwen3DSparkModel"] and native["target_layer_ids"] == c.target_layer_ids
    )
    assert native["tie_word_embeddings"] is False and native["num_hidden_layers"] == 2
    assert native["num_target_layers"] == 6 and native["dtype"] == native["torch_dtype"] == "bfloat16"

    fl = tiny_drafter(target, kind="dflash")
    dfl = json.loads((export_drafter(fl, tmp_path / "f", "dflash") / "config.json").read_text())
    assert dfl["architectures"] == ["DFlashDraftModel"] and dfl["num_target_layers"] == 6
    assert dfl["dflash_config"] == {
        "mask_token_id": MASK,
        "target_layer_ids": c.target_layer_ids,
        "block_size": 4,
    }
    spec_fl = json.loads((export_drafter(fl, tmp_path / "sf", "speculators") / "config.json").read_text())
    assert spec_fl["speculators_model_type"] == spec_fl["speculators_config"]["algorithm"] == "dflash"


def test_embeddings_omitted_and_sts(targets, tmp_path):
    target, tdir = targets["llama"]
    d = tiny_drafter(target, sts=[1.0, 0.9, 1.2, 1.5])
    out = export_drafter(d, tmp_path / "x", "speculators", "float32", include_embeddings=False)
    assert "embed_tokens.weight" not in load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["sts_temperatures"] == [1.0, 0.9, 1.2, 1.5]
    with pytest.raises(ExportInputError, match="pass the target's"):
        load_export(out)
    rep = check_export(out, target=tdir, reference=d)  # embeddings read from the target's safetensors
    assert rep.ok and any("reproduce" in m for m in rep.passed), rep.render()
    no_target = check_export(out)
    assert no_target.ok and any("logits not checked" in w for w in no_target.warnings)
    loaded = load_export(out, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    assert loaded.config.sts_temperatures == [1.0, 0.9, 1.2, 1.5]
    assert torch.equal(drafter_outputs(loaded)[0], drafter_outputs(d)[0])
    out2 = export_drafter(d, tmp_path / "y", "native", include_sts=False)
    assert "sts_temperatures" not in json.loads((out2 / "config.json").read_text())


@pytest.mark.parametrize(
    "kind,markov,needle", [("dspark", "vanilla", "Markov head"), ("dspark", "rnn", "Markov head")]
)
def test_dflash_refuses_markov(targets, tmp_path, kind, markov, needle):
    d = tiny_drafter(targets["qwen3"][0], kind=kind, markov=markov)
    with pytest.raises(FormatError, match=needle) as e:
        export_drafter(d, tmp_path / "x", "dflash")
    assert "export.format=speculators" in str(e.value)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    d.config.markov_rank = 0  # a confidence head alone is refused too
    with pytest.raises(FormatError, match="confidence head"):
        from deepspec.exporting.formats import to_dflash

        to_dflash(d.config, "bfloat16")


# --------------------------------------------------------------------------- planted faults
def _edit_config(out, fn):
    cfg = json.loads((out / "config.json").read_text())
    fn(cfg)
    (out / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(out, fn):
    t = load_file(str(out / "model.safetensors"))
    fn(t)
    save_file(t, str(out / "model.safetensors"))


def _errors(out, target):
    rep = check_export(out, target=target)
    assert not rep.ok, "the planted fault was not caught"
    return "\n".join(rep.errors)


@pytest.fixture()
def good(targets, tmp_path):
    target, tdir = targets["qwen3"]
    d = tiny_drafter(target)
    out = export_drafter(d, tmp_path / "good", "speculators", "float32")
    assert check_export(out, target=tdir).ok
    return out, tdir, d


def test_fault_missing_sample_from_anchor(good):
    out, tdir, _ = good
    _edit_config(out, lambda c: c.pop("sample_from_anchor"))
    err = _errors(out, tdir)
    assert "missing key 'sample_from_anchor'" in err and "<1% acceptance" in err


def test_fault_layer_ids_shifted_by_one(good, targets, tmp_path):
    out, tdir, d = good
    _edit_config(out, lambda c: c.update(aux_hidden_state_layer_ids=list(d.config.target_layer_ids)))
    err = _errors(out, tdir)
    assert "shifted by one" in err and "native target_layer_ids + 1" in err
    # The z-lab format takes native ids: a +1 there is the same trap the other way round.
    fl = tiny_drafter(targets["qwen3"][0], kind="dflash")
    dout = export_drafter(fl, tmp_path / "dfl", "dflash")
    _edit_config(
        dout,
        lambda c: c["dflash_config"].update(target_layer_ids=[i + 1 for i in fl.config.target_layer_ids]),
    )
    assert "shifted by one" in _errors(dout, tdir)


def test_fault_missing_tensor(good):
    out, tdir, _ = good
    _edit_tensors(out, lambda t: t.pop("layers.0.mlp.up_proj.weight"))
    assert "missing tensor 'layers.0.mlp.up_proj.weight' (expected shape [64, 32])" in _errors(out, tdir)


def test_fault_wrong_shape(good):
    out, tdir, _ = good
    _edit_tensors(out, lambda t: t.update({"fc.weight": t["fc.weight"][:, :-1].clone()}))
    assert "tensor 'fc.weight' has shape [32, 95], expected [32, 96]" in _errors(out, tdir)


def test_fault_vocab_mismatch(good, tmp_path):
    out, _, _ = good
    other = tiny_target("qwen3", vocab=V + 8)
    other.config.save_pretrained(str(tmp_path / "other"))  # config only: the check must not need weights
    err = _errors(out, tmp_path / "other")
    assert "vocab mismatch with the target: vocab_size=128" in err and f"vocab_size={V + 8}" in err


def test_fault_dtype_and_drifted_weights(good):
    out, tdir, _ = good
    _edit_tensors(out, lambda t: t.update({"norm.weight": t["norm.weight"].to(torch.bfloat16)}))
    assert "not in the declared dtype float32" in _errors(out, tdir)
    _edit_tensors(out, lambda t: t.update({"norm.weight": t["norm.weight"].float() * 1.5}))
    assert "logits differ from the original drafter's probe" in _errors(out, tdir)


def test_check_cli(good, capsys):
    from deepspec.export import check_main

    out, tdir, _ = good
    assert check_main([str(out), "--target", str(tdir)]) == 0
    assert "OK" in capsys.readouterr().out
    _edit_config(out, lambda c: c.pop("sample_from_anchor"))
    assert check_main([str(out), "--target", str(tdir)]) == 1
    assert "sample_from_anchor" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs(targets, tmp_path):
    d = tiny_drafter(targets["qwen3"][0])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ExportInputError, match="has not finished"):
        resolve_checkpoint(run)
    native = save_native(d, run / "drafter")
    assert resolve_checkpoint(run) == (native, run)
    assert resolve_checkpoint(native) == (native, run)  # the run's own drafter/ keeps its run (for the card)

    (native / "model.safetensors").write_bytes((native / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ExportInputError, match=r"drafter/model.safetensors: not a readable safetensors file"):
        load_export(native)
    (native / "model.safetensors").unlink()
    with pytest.raises(ExportInputError, match=r"drafter/model.safetensors not found"):
        load_export(native)
    (native / "config.json").write_text('{"vocab_size": 1')
    with pytest.raises(ExportInputError, match=r"drafter/config.json: invalid JSON"):
        load_export(native)
    targets["qwen3"][0].config.save_pretrained(str(native))  # a plain LM config, not a drafter
    with pytest.raises(ExportInputError, match="not a DSpark drafter config"):
        load_export(native)


def test_output_folder_rules(targets, tmp_path):
    d = tiny_drafter(targets["qwen3"][0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ExportInputError, match="not empty; pass export.overwrite=true"):
        export_drafter(d, out, "native")
    assert (out / "old.txt").read_text() == "keep me"
    export_drafter(d, out, "native", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "deepspec",  # extra.safetensors: the greedy confidence output, deepspec-only
        "deepspec_export.json",
        "model.safetensors",
    ]
    with pytest.raises(ExportInputError, match="contains the input"):
        export_drafter(d, tmp_path, "native", overwrite=True, protected=(out,))

    def fail(stage):
        raise ValueError("check failed")

    with pytest.raises(ValueError, match="check failed"):
        export_drafter(d, tmp_path / "never", "native", verify=fail)
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"


# --------------------------------------------------------------------------- the Hydra entry and the card
def _trainer_eval_json():
    """eval.json in the shape deepspec.eval.runner writes (per temperature, docs/method.md, Evaluation protocol statistics)."""

    def stats(t, tau, acc, cond, speed):
        return {
            "rounds": 25,
            "proposed": 100,
            "accepted": 56,
            "tau": tau,
            "acceptance_rate": acc,
            "conditional_acceptance": cond,
            "survival": [0.9, 0.6, 0.4, 0.2],
            "accepted_histogram": [2, 5, 6, 7, 5],
            "mean_confidence": [0.8, 0.6, 0.5, 0.4],
            "temperature": t,
            "num_prompts": 4,
            "spec_new_tokens": 96,
            "target_new_tokens": 96,
            "spec_tokens_per_s": 50.0,
            "target_tokens_per_s": 30.0,
            "speedup": speed,
            "draft_time_s": 0.4,
            "verify_time_s": 1.0,
            "identical_outputs": 4,
        }

    return {
        "block_size": 4,
        "target_layer_ids": [1, 2, 3],
        "markov_rank": 16,
        "markov_head_type": "vanilla",
        "max_new_tokens": 24,
        "seed": 0,
        "num_prompts": 4,
        "temperatures": {
            "0.0": stats(0.0, 3.2468, 0.5617, [0.9123, 0.6677, 0.5, None], 1.6667),
            "1.0": stats(1.0, 2.7531, 0.4383, [0.8111, 0.5222, 0.3333, 0.25], 1.25),
        },
    }


def _fake_run(tmp_path, d, tdir):
    run = tmp_path / "run"
    save_native(d, run / "drafter")
    (run / "eval.json").write_text(json.dumps(_trainer_eval_json()))
    (run / "acceptance.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "target": {"name_or_path": "tiny"},
                "model": {"kind": "dspark", "num_layers": 2, "block_size": 4},
                "data": {"source": "tiny_chat", "max_length": 256, "num_anchors": 64},
                "train": {"lr": 0.001, "max_steps": 300, "global_batch_size": 8},
            }
        )
    )
    (run / "train_summary.json").write_text(
        json.dumps(
            {"train_steps": 300, "train_time_s": 812.5, "final_metrics": {"loss": 1.2345, "tau_est": 2.9}}
        )
    )
    (run / "run_info.json").write_text(json.dumps({"target": str(tdir)}))
    return run


def test_card_renders_trainer_metrics(targets, tmp_path):
    from omegaconf import OmegaConf

    from deepspec.config import DeepSpecConfig
    from deepspec.exporting.pipeline import export_after_training

    target, tdir = targets["qwen3"]
    d = tiny_drafter(target)
    run = _fake_run(tmp_path, d, tdir)
    cfg = OmegaConf.structured(DeepSpecConfig)
    cfg.export.base_model = "Qwen/Qwen3-8B"
    cfg.export.repo_id = "alice/qwen3-8b-dspark"
    res = export_after_training(cfg, d, run, eval_result=None, echo=lambda s: None)
    assert res.output_dir == run / "export" / "speculators" and res.report.ok
    readme = (res.output_dir / "README.md").read_text()
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["base_model"] == "Qwen/Qwen3-8B" and meta["license"] == "apache-2.0"
    assert {"speculative-decoding", "dspark"} <= set(meta["tags"]) and meta["library_name"] == "deepspec"
    for value in (
        "| tiny_chat | 0.0 | 3.247 | 0.562 | 1.67× | 25 |",
        "| tiny_chat | 1.0 | 2.753 | 0.438 | 1.25× |",
        "| 0.912 | 0.668 | 0.500 | – |",
        "| 0.811 | 0.522 | 0.333 | 0.250 |",
        "![acceptance](plots/acceptance.png)",
        "| `train.lr` | 0.001 |",
        "final loss 1.234",
        "source: `tiny_chat`",
        "vllm serve Qwen/Qwen3-8B --speculative-config",
        '"model": "alice/qwen3-8b-dspark"',
    ):
        assert value in readme, value
    assert (res.output_dir / "plots" / "acceptance.png").exists()
    spec = json.loads((res.output_dir / "config.json").read_text())
    assert spec["speculators_config"]["verifier"]["name_or_path"] == "Qwen/Qwen3-8B"
    # A second run into the same output dir replaces its own export.
    assert export_after_training(cfg, d, run, echo=lambda s: None).report.ok


def test_hydra_entry(targets, tmp_path):
    target, tdir = targets["llama"]
    run = _fake_run(tmp_path, tiny_drafter(target), tdir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "deepspec" / "export.py"),
        f"export.checkpoint={run}",
        "export.format=native",
        f"export.output_dir={tmp_path / 'exp'}",
        "export.dtype=float32",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "check" in r.stdout and "OK" in r.stdout
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["dtype"] == "float32"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "not empty; pass export.overwrite=true" in r.stderr
