"""One export, end to end: read the checkpoint, write the format, card and check it, push it.

Cheap refusals come first (unknown format, bad repo id, no token, occupied output folder), so a
mistake costs a second, not a model load; the checker runs on the staged folder, so an export that
fails it never appears at ``output_dir``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from deepspec.config import validate
from deepspec.exporting.card import build_card, read_run_file
from deepspec.exporting.check import check_export
from deepspec.exporting.formats import default_include_embeddings, format_config
from deepspec.exporting.hub import HubError, PushPlan, push_folder, resolve_token, validate_repo_id
from deepspec.exporting.io import ExportInputError, check_output_dir
from deepspec.exporting.public import public_name, public_value, require_hub_verifier
from deepspec.exporting.target_info import TargetInfo, read_target
from deepspec.exporting.writer import export_drafter, load_export, resolve_checkpoint
from deepspec.models import Drafter
from deepspec.training.run_dir import run_lock


@dataclass
class ExportResult:
    output_dir: Path
    format: str
    report: Any = None  # CheckReport, or None with export.check=false
    push: Optional[PushPlan] = None


def check_export_settings(e) -> None:
    """The refusals that need no model: unknown format or dtype, bad repo id, missing Hub token."""
    validate(e, prefix="export")  # export.format / export.dtype choices
    if e.push_to_hub or e.dry_run:
        validate_repo_id(e.repo_id)
    if e.push_to_hub and not e.dry_run and resolve_token() is None:
        raise HubError(
            "export.push_to_hub=true but no Hugging Face token: set HF_TOKEN or run `hf auth login` "
            "(checked before any export or upload work)"
        )


def check_push_verifier(cfg) -> None:
    """Training with ``export.push_to_hub``: refuse at start-up a push whose verifier would only be a
    local folder (``export.base_model`` unset and ``target.name_or_path`` not a Hub id)."""
    e = cfg.export
    if e.after_training and (e.push_to_hub or e.dry_run):
        name = e.base_model or cfg.target.name_or_path
        require_hub_verifier(public_name(name), name)


def _target_path(e, run_dir: Optional[Path]) -> Optional[str]:
    if e.target:
        return e.target
    info = read_run_file(run_dir / "run_info.json") if run_dir else None
    t = (info or {}).get("target")
    return t if t and Path(t).is_dir() else None


def _base_model(e, drafter: Drafter, run_dir: Optional[Path], target_path: Optional[str]) -> str:
    if e.base_model:
        return e.base_model
    run_cfg = read_run_file(run_dir / "config.yaml") if run_dir else None
    name = ((run_cfg or {}).get("target") or {}).get("name_or_path") if isinstance(run_cfg, dict) else None
    if name and name != "tiny":
        return str(name)
    return str(drafter.config.target_config.get("_name_or_path") or target_path or "")


def run_export(
    e,
    drafter: Optional[Drafter] = None,
    run_dir: Optional[Path] = None,
    eval_result: Any = None,
    echo: Callable[[str], None] = print,
    default_overwrite: bool = False,
) -> ExportResult:
    """Run one export as configured by ``e`` (an :class:`deepspec.config.ExportConfig`)."""
    check_export_settings(e)
    if drafter is not None:  # the trainer's own export: the training holds its run's lock
        return _export(e, drafter, None, (), run_dir, eval_result, echo, default_overwrite)
    if not e.checkpoint:
        raise ExportInputError("export.checkpoint is not set: give a drafter folder or a training output dir")
    src, found_run = resolve_checkpoint(e.checkpoint)
    protected = (src,) + ((found_run,) if found_run else ())
    # Exporting from a training run: refused while a training (or an evaluation / export) writes there.
    with run_lock(found_run, "export"):
        return _export(e, None, src, protected, run_dir or found_run, eval_result, echo, default_overwrite)


def _export(e, drafter, src, protected, run_dir, eval_result, echo, default_overwrite) -> ExportResult:
    out = (
        Path(e.output_dir)
        if e.output_dir
        else (Path(run_dir) / "export" / e.format if run_dir else Path(f"{src}-{e.format}"))
    )
    overwrite = e.overwrite or (default_overwrite and not e.output_dir)
    check_output_dir(out, overwrite, protected, e.overwrite_training_run)
    if drafter is None:
        drafter = load_export(src)
    run_dir = Path(run_dir) if run_dir else None

    target_path = _target_path(e, run_dir)
    known_as = _base_model(e, drafter, run_dir, target_path)
    # An export may be published: it names the verifier by Hub id, or by a local folder's name only.
    base_model = public_name(known_as)
    if e.push_to_hub or e.dry_run:
        require_hub_verifier(base_model, known_as)
    c = drafter.config
    c = dataclasses.replace(
        c, target_config={**public_value(dict(c.target_config)), "_name_or_path": base_model}
    )
    format_config(
        c, e.format, e.dtype, e.include_sts
    )  # refuses e.g. a Markov head in dflash, before any write
    with_embed = default_include_embeddings(e.format, e.include_embeddings)
    target = (
        read_target(target_path, load_head=not with_embed)
        if target_path
        else TargetInfo(dict(c.target_config), where="the drafter's recorded target config")
    )

    extra = {}
    if e.card:
        readme, plots = build_card(
            c,
            e.format,
            base_model=base_model,
            repo_id=e.repo_id,
            license=e.license,
            library_name=e.library_name,
            dtype=e.dtype,
            embeddings_included=with_embed,
            run_dir=run_dir,
            eval_result=eval_result,
        )
        extra = {"README.md": readme, **plots}

    result = ExportResult(out, e.format)

    def verify(stage: Path) -> None:
        result.report = check_export(stage, target=target, reference=drafter, display_path=out)
        result.report.raise_if_failed()

    source = (run_dir or Path(src or "")).name  # a name, not a local path: the record may go public
    export_drafter(
        drafter,
        out,
        e.format,
        e.dtype,
        e.include_embeddings,
        e.include_sts,
        overwrite,
        extra,
        protected,
        source=source,
        verify=verify if e.check else None,
        config=c,
        overwrite_training_run=e.overwrite_training_run,
    )
    echo(f"exported {e.format} ({e.dtype}) to {out}")
    if result.report is not None:
        echo(result.report.render())
    if e.push_to_hub or e.dry_run:
        result.push = push_folder(out, e.repo_id, e.private, e.revision, e.commit_message, e.dry_run, echo)
    return result


def export_after_training(
    cfg, drafter: Drafter, out_dir, eval_result: Any = None, echo: Callable[[str], None] = print
) -> Optional[ExportResult]:
    """Called by the trainer (main process only) after the native save and the evaluation.

    Exports ``cfg.export.format`` into ``<out_dir>/export/<format>`` (replacing an earlier export of the
    same run) unless ``export.after_training=false``; pushes when ``export.push_to_hub=true``.
    """
    from deepspec.config import ExportConfig

    e = getattr(cfg, "export", None) or ExportConfig()
    if not e.after_training:
        return None
    if drafter.config.kind == "eagle3":
        echo(
            f"export: skipped, the export formats carry DSpark/DFlash drafters, not "
            f"{drafter.config.kind} (its native folder is in {Path(out_dir) / 'drafter'})"
        )
        return None
    return run_export(
        e, drafter=drafter, run_dir=Path(out_dir), eval_result=eval_result, echo=echo, default_overwrite=True
    )
