"""Evaluate a drafter: ``python deepspec/evaluate.py eval.drafter=outputs/tiny-dspark``.

Same Hydra config tree as training (configs/evaluate.yaml = train.yaml's groups plus evaluation
defaults), so ``recipe=...`` / ``target.*`` pick the target the drafter was trained for. Runs
chain speculative decoding on each dataset of ``eval.datasets`` at each of ``eval.temperatures``,
then calibration (STS), the threshold sweep and the scheduler simulation; writes ``eval.json``,
``rounds.jsonl`` and PNG plots to ``eval.output_dir`` (default: ``<run dir>/eval``).

    python deepspec/evaluate.py eval.drafter=/tmp/ev-run eval.num_prompts=200 eval.save_sts=true
    python deepspec/evaluate.py eval.drafter=/path/drafter eval.datasets=[gsm8k,mt-bench] \\
        target.name_or_path=Qwen/Qwen3-4B
"""

from deepspec.entrypoint import hydra_entry  # first import: see deepspec/entrypoint.py


@hydra_entry("evaluate")
def main(cfg) -> None:
    import logging
    import sys

    from deepspec.config import ConfigError
    from deepspec.eval.pipeline import run_evaluation
    from deepspec.training.run_dir import RunLockedError

    logging.getLogger("deepspec").setLevel(logging.INFO)
    try:
        run_evaluation(cfg)
    except (ConfigError, RunLockedError) as e:  # a bad value or a busy run: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
