"""The model card (README.md) of an export: what the drafter is, how well it drafts, how it was made.

Everything is read leniently from the training run folder (eval.json, config.yaml,
train_summary.json, *.png next to eval.json): a missing or differently shaped file drops its
section instead of failing the export, because the eval schema is still evolving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from deepspec.exporting.formats import SAMPLE_FROM_ANCHOR
from deepspec.exporting.public import is_hub_id, public_value
from deepspec.models.config import DrafterSpec

_SOURCES = {
    "tiny_chat": "chat pairs cut from the Python standard library sources of the training machine "
    "(user: a function's signature and docstring; assistant: its body), tokenised with the "
    "tiny target's chat template; loss on assistant tokens only",
}


def conf_outputs(c) -> str:
    if not c.enable_confidence_head:
        return "off"
    return (
        "sampling (T > 0) and greedy (T = 0) outputs"
        if c.greedy_confidence
        else "one output (sampling acceptance)"
    )


def _num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


# --------------------------------------------------------------------------- eval.json, leniently
def eval_rows(ev: Any, default_dataset: str = "eval") -> List[Dict[str, Any]]:
    """Flatten the shapes eval.json may take into rows {dataset, temperature, stats}."""
    rows: List[Dict[str, Any]] = []
    if isinstance(ev, list):
        for r in ev:
            if isinstance(r, dict) and "tau" in r:
                rows.append(
                    {
                        "dataset": r.get("dataset", default_dataset),
                        "temperature": r.get("temperature"),
                        "stats": r,
                    }
                )
        return rows
    if not isinstance(ev, dict):
        return rows
    if isinstance(ev.get("datasets"), dict):
        for name, sub in ev["datasets"].items():
            rows += eval_rows(sub, name)
        return rows
    if isinstance(ev.get("temperatures"), dict):
        for key, st in ev["temperatures"].items():
            if isinstance(st, dict):
                rows.append(
                    {
                        "dataset": ev.get("dataset", default_dataset),
                        "temperature": st.get("temperature", key),
                        "stats": st,
                    }
                )
        return rows
    if "tau" in ev:
        return [
            {"dataset": ev.get("dataset", default_dataset), "temperature": ev.get("temperature"), "stats": ev}
        ]
    for name, sub in ev.items():  # {dataset: {...}} at the top level
        if isinstance(sub, dict) and ("temperatures" in sub or "tau" in sub):
            rows += eval_rows(sub, name)
    return rows


def _slot_curve(st: Dict[str, Any]) -> Optional[List[Any]]:
    for key in ("conditional_acceptance", "acceptance_per_slot", "accept_per_slot"):
        if isinstance(st.get(key), list):
            return st[key]
    return None


def eval_section(ev: Any, dataset: str, plots: List[str]) -> str:
    rows = eval_rows(ev, dataset)
    if not rows:
        return "## Evaluation\n\nNo evaluation results were found for this drafter (no eval.json).\n"
    out = [
        "## Evaluation",
        "",
        "Offline protocol of the DSpark paper: chain drafting, batch 1, full block; τ = accepted drafts + 1 per round.",
        "",
        "| Dataset | T | τ (accepted length) | Acceptance rate | Speedup | Rounds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["stats"]
        speed = f"{_num(st.get('speedup'), 2)}×" if isinstance(st.get("speedup"), (int, float)) else "–"
        out.append(
            f"| {r['dataset']} | {r['temperature']} | {_num(st.get('tau'))} | "
            f"{_num(st.get('acceptance_rate'))} | {speed} | {st.get('rounds', '–')} |"
        )
    curves = [(r, _slot_curve(r["stats"])) for r in rows]
    curves = [(r, c) for r, c in curves if c]
    if curves:
        k = max(len(c) for _, c in curves)
        out += [
            "",
            "Conditional acceptance per draft slot k (accepted at k, given 1..k-1 accepted):",
            "",
            "| Dataset | T | " + " | ".join(f"k={i}" for i in range(1, k + 1)) + " |",
            "|---|---|" + "---|" * k,
        ]
        for r, c in curves:
            cells = [_num(v) for v in c] + ["–"] * (k - len(c))
            out.append(f"| {r['dataset']} | {r['temperature']} | " + " | ".join(cells) + " |")
    for p in plots:
        out += ["", f"![{Path(p).stem}]({p})"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- training summary
def _get(d: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


_TRAIN_KEYS = (
    "target.name_or_path",
    "model.kind",
    "model.num_layers",
    "model.block_size",
    "model.markov_rank",
    "model.markov_head_type",
    "model.enable_confidence_head",
    "loss.ce_weight",
    "loss.l1_weight",
    "loss.confidence_weight",
    "loss.decay_gamma",
    "train.lr",
    "train.max_steps",
    "train.epochs",
    "train.global_batch_size",
    "train.mixed_precision",
    "train.seed",
)


def training_section(run_cfg: Optional[Dict[str, Any]], summary: Optional[Dict[str, Any]]) -> str:
    out = ["## Training", ""]
    if run_cfg:
        out += ["| Setting | Value |", "|---|---|"]
        out += [f"| `{k}` | {_get(run_cfg, k)} |" for k in _TRAIN_KEYS if _get(run_cfg, k) is not None]
    if summary:
        fm = summary.get("final_metrics") or {}
        bits = [
            f"{summary['train_steps']} optimizer steps" if "train_steps" in summary else None,
            f"{summary['train_time_s']:.0f} s"
            if isinstance(summary.get("train_time_s"), (int, float))
            else None,
            f"final loss {_num(fm.get('loss'))}" if "loss" in fm else None,
            f"teacher-forced τ estimate {_num(fm.get('tau_est'))}" if "tau_est" in fm else None,
        ]
        out += ["", "Run: " + ", ".join(b for b in bits if b) + "."]
    if not run_cfg and not summary:
        out.append("No training config was found next to the checkpoint.")
    data = (run_cfg or {}).get("data") or {}
    src = data.get("source")
    out += ["", "### Data provenance", ""]
    if src:
        out.append(f"- source: `{src}`" + (f": {_SOURCES[src]}" if src in _SOURCES else ""))
        out += [f"- `data.{k}`: {v}" for k, v in data.items() if k != "source"]
        out.append(
            "- targets: the frozen target's own next-token distributions on these sequences (distillation)"
        )
    else:
        out.append("Not recorded (no config.yaml with a `data` section next to the checkpoint).")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- the card
def build_card(
    c: DrafterSpec,
    fmt: str,
    *,
    base_model: str,
    repo_id: Optional[str],
    license: str,
    library_name: str,
    dtype: str,
    embeddings_included: bool,
    run_dir: Optional[Path] = None,
    eval_result: Any = None,
) -> Tuple[str, Dict[str, Path]]:
    """README.md text and the plot files to copy ({name in export: source path})."""
    run_cfg = summary = None
    plots: Dict[str, Path] = {}
    if run_dir is not None:
        run_cfg = public_value(read_run_file(run_dir / "config.yaml"))  # no local paths in a card
        summary = read_run_file(run_dir / "train_summary.json")
        if eval_result is None:
            eval_result = read_run_file(run_dir / "eval.json")
        if (run_dir / "eval.json").exists() or eval_result is not None:
            for png in sorted(run_dir.glob("*.png")) + sorted((run_dir / "plots").glob("*.png")):
                plots[f"plots/{png.name}"] = png
    kind = c.kind
    meta: Dict[str, Any] = {}
    if is_hub_id(base_model):
        meta["base_model"] = base_model
    meta.update(
        license=license,
        library_name=library_name,
        tags=["speculative-decoding", kind, "draft-model", "deepspec", f"{fmt}-format"],
    )
    where = repo_id or "<path-or-repo-of-this-folder>"
    heads = []
    if c.markov_enabled:
        heads.append(
            f"a rank-{c.markov_rank} {c.markov_head_type} Markov head (left-to-right correction of "
            "each slot's logits from the previous token)"
        )
    if c.enable_confidence_head:
        heads.append(
            "a confidence head (per-slot probability that the draft survives verification"
            + (" at T > 0; a second output for greedy decoding at T = 0" if c.greedy_confidence else "")
            + (", calibrated with STS" if c.sts_temperatures or c.sts_by_temperature else "")
            + ")"
        )
    ds = (run_cfg or {}).get("data", {}).get("source", "eval") if isinstance(run_cfg, dict) else "eval"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {dict(dspark='DSpark', dflash='DFlash')[kind]} drafter for `{base_model or 'its target model'}`",
        "",
        f"A speculative-decoding drafter trained with deepspec. Given the anchor token and the target's hidden "
        f"states from layers {list(c.target_layer_ids)}, it proposes {c.block_size} tokens in one parallel "
        f"pass of {c.num_layers} layer(s)" + (", with " + " and ".join(heads) if heads else "") + ". "
        "The target verifies them, so outputs are distributed exactly as the target's own.",
        "",
        f"Format: **{fmt}** ({dtype} safetensors"
        + ("" if embeddings_included else "; embedding and lm_head omitted: shared from the target")
        + ").",
        "",
        "| Fact | Value |",
        "|---|---|",
        f"| block size γ (drafts per round) | {c.block_size} |",
        f"| target layers (HF `hidden_states[i+1]`, native ids) | {list(c.target_layer_ids)} |",
        f"| vLLM `aux_hidden_state_layer_ids` (native + 1) | {[i + 1 for i in c.target_layer_ids]} |",
        f"| mask token id | {c.mask_token_id} |",
        f"| `sample_from_anchor` | {str(SAMPLE_FROM_ANCHOR).lower()} (draft 1 is predicted at the anchor slot) |",
        f"| Markov head | {f'rank {c.markov_rank}, {c.markov_head_type}' if c.markov_enabled else 'off'} |",
        f"| confidence head | {conf_outputs(c)} |",
    ]
    for key, fit in sorted((c.sts_by_temperature or {}).items(), key=lambda kv: float(kv[0])):
        lines.append(f"| STS temperatures at decoding T = {float(key):g} | {[round(t, 3) for t in fit]} |")
    if c.sts_temperatures:
        lines.append(
            f"| STS temperatures (single fit, any T) | {[round(t, 3) for t in c.sts_temperatures]} |"
        )
    lines += [
        "",
        eval_section(eval_result, ds, list(plots)),
        training_section(run_cfg, summary),
        serving_section(
            fmt,
            kind,
            base_model,
            where,
            c.block_size,
            c.enable_confidence_head,
            read_run_file(run_dir / "engine-check" / "engine_check.json") if run_dir else None,
        ),
    ]
    return "\n".join(lines).rstrip() + "\n", plots


def serving_section(
    fmt: str, kind: str, base_model: str, where: str, gamma: int, confidence: bool = False, engine_check=None
) -> str:
    from deepspec.engine.serving import serve_command, serving_settings

    settings = serving_settings({"speculators_model_type": kind}, gamma, confidence_head=confidence)
    # An export names no local folder: a target known only locally is shown as a placeholder.
    target = base_model if is_hub_id(base_model) else f"<path or Hub id of {base_model or 'the target'}>"
    out = [
        "## Serving with vLLM",
        "",
        "Requests at temperature 0 (greedy):",
        "",
        "```bash",
        serve_command(target, where, settings, sampling=False),
        "```",
        "",
        "Requests at temperature > 0: the drafts must be drawn from the drafter's distribution "
        '(`"draft_sample_method": "probabilistic"`); vLLM\'s default (`greedy`) treats them as one-hot '
        "and loses most of the acceptance (docs/engine.md in deepspec):",
        "",
        "```bash",
        serve_command(target, where, settings, sampling=True),
        "```",
    ]
    if settings["enable_adaptive_verification"]["available"]:
        out += [
            "",
            "On a GPU, vLLM can size each verification from this drafter's confidence head: add "
            '`"enable_adaptive_verification": true` (it needs CUDA graphs; not on CPU).',
        ]
    if fmt == "speculators":
        out += [
            "",
            "This folder is in the speculators format, whose config names the verifier, so "
            f"`vllm serve {where}` alone also works where speculators models are supported "
            "(greedy drafting only; vLLM reads γ and the method from the folder).",
        ]
    elif fmt == "dflash":
        out += [
            "",
            "z-lab DFlash runtimes draft from the MASK slots; this drafter drafts from the anchor slot "
            "(`sample_from_anchor: true`), so use an engine that honours that key.",
        ]
    if engine_check:
        out += ["", engine_check_section(engine_check)]
    out += [
        "",
        "Load it in Python: `from deepspec.exporting import load_export; drafter = load_export(path)`.",
    ]
    return "\n".join(out) + "\n"


# The engine check rewrites its section of an existing card in place, between these marks.
ENGINE_MARKS = ("<!-- engine-check -->", "<!-- /engine-check -->")


def with_engine_check(card: str, report: Dict[str, Any]) -> str:
    section = engine_check_section(report)
    start, end = card.find(ENGINE_MARKS[0]), card.find(ENGINE_MARKS[1])
    if start >= 0 and end > start:
        return card[:start] + section + card[end + len(ENGINE_MARKS[1]) :]
    return card.rstrip() + "\n\n" + section + "\n"


def engine_check_section(report: Dict[str, Any]) -> str:
    """The engine round trip (scripts/engine_check.py) as a table: vLLM next to deepspec."""
    rows = [
        "### Engine check (vLLM against deepspec's own decoding)",
        "",
        f"{report.get('prompts', '?')} prompts, {report.get('max_new_tokens', '?')} new tokens; "
        f"result: **{'pass' if report.get('ok') else 'FAIL'}**.",
        "",
        "The check fails when a greedy output differs or when vLLM's τ falls below deepspec's by more "
        "than the 95 % interval of the difference (±; paired per prompt at T=0, two independent samples "
        "at T>0).",
        "",
        "| T | vLLM draft sampling | τ deepspec [95 % CI] | τ vLLM [95 % CI] | ± | greedy outputs identical | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.get("runs", []):
        d, v = r.get("deepspec", {}), r.get("vllm", {})

        def tau(x):
            ci = x.get("tau_ci95") or [None, None]
            return f"{_num(x.get('tau'))} [{_num(ci[0])}, {_num(ci[1])}]"

        same = f"{r.get('identical_outputs')}/{report.get('prompts')}" if r.get("temperature") == 0 else "–"
        verdict = "pass" if r.get("ok") else "FAIL" if "ok" in r else "?"
        rows.append(
            f"| {r.get('temperature')} | {r.get('draft_sample_method')} | {tau(d)} | {tau(v)} "
            f"| {_num(r.get('margin95'))} | {same} | {verdict} |"
        )
    return ENGINE_MARKS[0] + "\n" + "\n".join(rows) + "\n" + ENGINE_MARKS[1]


def read_run_file(path: Path) -> Optional[Dict[str, Any]]:
    """A run folder's side file (config.yaml, train_summary.json, run_info.json, eval.json): its
    contents, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError):
        return None  # a broken side file loses its card section; the weights are what matters
    return data if isinstance(data, (dict, list)) else None
