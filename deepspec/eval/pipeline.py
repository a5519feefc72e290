"""The `deepspec/evaluate.py` job: load, check, decode every dataset, analyse, write, optionally store STS.

Order matters for users: every input check (temperatures, drafter vs target config, dataset keys)
runs before the first token is decoded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch

from deepspec import atomic
from deepspec.config import validate
from deepspec.secrets import config_yaml
from deepspec.training.run_dir import run_lock

log = logging.getLogger("deepspec")


def default_output_dir(drafter_dir: Path, from_run_dir: bool) -> Path:
    return drafter_dir.parent / "eval" if from_run_dir else drafter_dir.parent / f"{drafter_dir.name}-eval"


def sts_to_store(report: Dict, temperature: Optional[float] = None) -> Dict[str, list]:
    """The STS temperatures fitted on the primary dataset's rounds, keyed by decoding temperature
    (:func:`~deepspec.models.config.sts_key`): every decoded temperature's fit, or only
    ``temperature``'s when given."""
    from deepspec.models.config import sts_key

    out = {}
    for s in report["temperatures"].values():
        t = float(s["temperature"])
        if (temperature is None or t == float(temperature)) and s.get("confidence"):
            out[sts_key(t)] = s["confidence"]["sts_temperatures"]
    return out


def save_sts(drafter, drafter_dir: Path, fits: Dict[str, list]) -> None:
    """Merge ``fits`` (decoding temperature -> STS temperatures) into the drafter's
    ``sts_by_temperature`` and re-save the folder (same dtype). Fits at other temperatures stay."""
    from deepspec.exporting.native import save_native
    from deepspec.models.config import normalise_sts

    saved = json.loads((drafter_dir / "config.json").read_text())
    c = drafter.config
    merged = dict(c.sts_by_temperature or {})
    merged.update(normalise_sts(fits, c.block_size))
    c.sts_by_temperature = merged
    save_native(drafter, drafter_dir, dtype=saved.get("torch_dtype", "bfloat16"))


def owning_run(drafter_dir: Path, from_run_dir: bool) -> Optional[Path]:
    """The training run an evaluation writes into (its ``eval/``, and its ``drafter/`` with
    ``eval.save_sts``): ``eval.drafter`` is the run folder or the run's ``drafter/`` folder."""
    if from_run_dir:
        return drafter_dir.parent
    if drafter_dir.name == "drafter" and (drafter_dir.parent / "config.yaml").is_file():
        return drafter_dir.parent
    return None


def run_evaluation(cfg) -> Dict:
    """Everything `python deepspec/evaluate.py` does; returns the report (also in eval.json)."""
    from deepspec.eval.loading import check_inputs

    validate(cfg)  # every number and choice, before the drafter or the target loads
    from deepspec.target.sharding import refuse_target_shard

    refuse_target_shard(cfg, "evaluation (deepspec/evaluate.py)")
    e = cfg.eval
    if e.num_threads > 0:
        torch.set_num_threads(e.num_threads)
    inputs = check_inputs(cfg)  # drafter vs target, from config files: before any weights load
    # A training (or another evaluation / export) writing into the same run is refused before any load.
    with run_lock(owning_run(inputs["drafter_dir"], inputs["from_run_dir"]), "evaluation"):
        return _evaluate(cfg, inputs)


def _evaluate(cfg, inputs: Dict) -> Dict:
    from deepspec.data.chat import end_of_turn_ids
    from deepspec.eval.datasets import dataset_labels, load_prompt_texts, select, tokenize_prompts
    from deepspec.eval.loading import load_models
    from deepspec.eval.runner import evaluate_datasets
    from deepspec.eval.scheduler import SPSCurve

    e = cfg.eval
    tokenizer = inputs["tokenizer"]
    prompts = {}
    labels = dataset_labels([str(n) for n in e.datasets])
    for name in e.datasets:
        texts = select(load_prompt_texts(str(name), cfg), e.num_prompts, e.seed)
        prompts[labels[str(name)]] = tokenize_prompts(tokenizer, texts)
        log.info("dataset %s: %d prompts", name, len(texts))
    sps = SPSCurve.load(e.sps_profile) if e.sps_profile else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target, drafter = load_models(cfg, inputs, device)

    drafter_dir = inputs["drafter_dir"]
    out_dir = Path(e.output_dir) if e.output_dir else default_output_dir(drafter_dir, inputs["from_run_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_dir / "config.yaml", config_yaml(cfg))  # credentials redacted

    report = evaluate_datasets(
        target,
        drafter,
        prompts,
        e,
        end_of_turn_ids(tokenizer),
        out_dir=str(out_dir),
        progress=e.progress_bar,
        sps=sps,
    )
    report["drafter_dir"] = str(drafter_dir)
    report["target"] = inputs["target_path"]
    if e.save_sts:
        fits = sts_to_store(report, e.sts_fit_temperature)
        if not fits:
            which = (
                "any decoding temperature"
                if e.sts_fit_temperature is None
                else f"decoding temperature {e.sts_fit_temperature}"
            )
            raise ValueError(
                f"eval.save_sts: no STS fit at {which} "
                "(the drafter needs a confidence head, eval.calibration must be on)"
            )
        save_sts(drafter, drafter_dir, fits)
        report["sts_saved"] = {"sts_by_temperature": fits, "drafter_dir": str(drafter_dir)}
        log.info("stored sts_by_temperature=%s in %s", fits, drafter_dir / "config.json")
    atomic.write_json(out_dir / "eval.json", report)
    print(f"eval.json written to {out_dir}")
    return report
