"""Decode token-id prompts with vLLM's offline engine and record per-prompt speculative statistics.

Runs INSIDE the vLLM environment (scripts/make_vllm_env.sh), never in deepspec's own: it imports
only the standard library and vLLM, so the two environments' transformers pins never meet.
Started by :mod:`deepspec.engine.check` as ``python vllm_worker.py REQUEST.json RESULT.json``.

The request holds the target folder, the speculative config (or null for the plain target), the
prompts as token ids, the token budget, temperature, seed and stop ids. The result holds, per
prompt, the generated ids and the change of vLLM's own speculative-decoding counters while that
prompt ran (prompts run one at a time, batch 1, like deepspec's evaluator): drafts (rounds),
draft tokens, accepted tokens and accepted tokens per draft position.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _counters(llm) -> dict:
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": []}
    names = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    for m in llm.get_metrics():
        if m.name in names:
            out[names[m.name]] += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            vals = [int(v) for v in m.values]
            if len(out["per_pos"]) < len(vals):
                out["per_pos"] += [0] * (len(vals) - len(out["per_pos"]))
            for i, v in enumerate(vals):
                out["per_pos"][i] += v
    return out


def _delta(after: dict, before: dict) -> dict:
    pos = [
        a - (before["per_pos"][i] if i < len(before["per_pos"]) else 0)
        for i, a in enumerate(after["per_pos"])
    ]
    return {k: after[k] - before[k] for k in ("drafts", "draft_tokens", "accepted")} | {"per_pos": pos}


def main(request_path: str, result_path: str) -> int:
    req = json.loads(open(request_path).read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(
        model=req["target"],
        tokenizer=req["target"],
        dtype=req.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=int(req.get("max_model_len", 512)),
        max_num_seqs=1,
        seed=int(req.get("seed", 0)),
        speculative_config=req.get("speculative_config"),
        disable_log_stats=False,
    )
    load_s = time.time() - t0
    results = []
    t1 = time.time()
    for i, ids in enumerate(req["prompts"]):
        params = SamplingParams(
            max_tokens=int(req["max_new_tokens"]),
            temperature=float(req["temperature"]),
            seed=int(req.get("seed", 0)) * 1_000_003 + i,
            stop_token_ids=list(req.get("stop_ids") or []),
            ignore_eos=not req.get("stop_ids"),
        )
        before = _counters(llm)
        out = llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)
        results.append({"tokens": list(out[0].outputs[0].token_ids), **_delta(_counters(llm), before)})
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"load_s": load_s, "decode_s": time.time() - t1, "prompts": results}, f)
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
