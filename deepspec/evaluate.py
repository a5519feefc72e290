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

import os
import sys

# Run as a script, this file's folder would shadow top-level modules named like ours (data, eval...).
_here = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _here:
    sys.path.pop(0)

import hydra  # noqa: E402

from deepspec.config import register_configs  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(_here), "configs")
register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg) -> None:
    import logging

    from deepspec.eval.pipeline import run_evaluation

    logging.getLogger("deepspec").setLevel(logging.INFO)
    run_evaluation(cfg)


if __name__ == "__main__":
    main()
