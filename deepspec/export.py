"""Export, check and share a drafter.

    python deepspec/export.py export.checkpoint=outputs/tiny-dspark export.format=speculators \\
        export.output_dir=exports/tiny [export.dtype=float32] [export.push_to_hub=true export.repo_id=me/x]
    python deepspec/export.py check DIR [--target TARGET_DIR] [--reference DRAFTER_DIR]

The export form is Hydra (configs/export.yaml, keys typed by ExportConfig in deepspec/config/);
the check form is a plain command line, since it takes a folder and not a configuration.
Exit status: 0 on success, 1 when the check fails or the input is refused (message on stderr).
"""

import sys

from deepspec.entrypoint import hydra_entry  # first import: see deepspec/entrypoint.py


def _user_errors():
    """Errors a user can act on (bad input, failed check, refused push, a run in use): one message,
    no traceback."""
    from deepspec.exporting.hub import HubError
    from deepspec.training.run_dir import RunLockedError

    return (ValueError, HubError, RunLockedError)


def check_main(argv) -> int:
    import argparse

    from deepspec.exporting.check import check_export

    ap = argparse.ArgumentParser(
        prog="deepspec/export.py check", description="Check an exported drafter folder."
    )
    ap.add_argument("dir", help="export folder (native, speculators or dflash)")
    ap.add_argument("--target", help="local target model folder (config.json, optional safetensors weights)")
    ap.add_argument(
        "--reference",
        help="drafter folder to compare logits against (default: the probe stored in deepspec_export.json)",
    )
    args = ap.parse_args(argv)
    try:
        report = check_export(args.dir, target=args.target, reference=args.reference)
    except _user_errors() as e:  # an unreadable --target/--reference: still a one-line answer
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.render())
    return 0 if report.ok else 1


@hydra_entry("export")
def export_main(cfg) -> None:
    from deepspec.config import validate
    from deepspec.exporting.pipeline import run_export

    try:
        validate(cfg)
        run_export(cfg.export)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "check":
        sys.exit(check_main(sys.argv[2:]))
    export_main()


if __name__ == "__main__":
    main()
