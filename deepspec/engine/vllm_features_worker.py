"""Run token-id sequences through vLLM and write the chosen layers' hidden states, part by part.

Runs INSIDE the vLLM environment (scripts/make_vllm_env.sh or ``DEEPSPEC_VLLM_PYTHON``), never in
deepspec's own: it imports the standard library, torch, safetensors and vLLM (all of them vLLM's),
never deepspec. Started by :mod:`deepspec.engine.features` as
``python vllm_features_worker.py REQUEST.json``.

The request holds the target folder, its dtype, the tensor-parallel size, vLLM's aux layer ids,
the output folder and a list of parts, each a name and its sequences as token ids. vLLM runs
every sequence as a prompt with one output token under ``method="extract_hidden_states"``; its KV
connector writes each prompt's states to a file, which is read back here, and each part is written
as ``<name>.safetensors``: ``hidden_states`` [tokens of all its sequences, aux layers, hidden] in
vLLM's layer order (ascending aux id) and ``lengths`` [sequences]. A part appears under its final
name only when complete (written to a temporary name, then renamed). At most ``max_pending``
parts wait unread at a time (the reader deletes a part once it has it), so disk use stays bounded
however long the collection. ``done.json`` is written last.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time


def _read_states(path: str):
    """The connector's file for one request, once its writer has released the lock."""
    from safetensors.torch import load_file

    lock = path + ".lock"
    if os.path.exists(lock):
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # waits while the connector still writes
    data = load_file(path, device="cpu")
    for p in (path, lock):
        if os.path.exists(p):
            os.remove(p)
    return data


def _wait_for_room(out_dir: str, max_pending: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(n.endswith(".safetensors") for n in os.listdir(out_dir)) >= max_pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no part of {out_dir} was read for {timeout_s:.0f} s (is the reader alive?)")
        time.sleep(0.2)


def main(request_path: str) -> int:
    req = json.loads(open(request_path).read())
    import torch
    from safetensors.torch import save_file
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out_dir = req["out_dir"]
    states_dir = os.path.join(out_dir, "requests")
    os.makedirs(states_dir, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    connector = {
        # vLLM's own connector needs CUDA streams; our shim (deepspec_vllm_shims) copies on the CPU.
        "kv_connector": "ExampleHiddenStatesConnector" if on_gpu else "CPUHiddenStatesConnector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": states_dir},
    }
    if not on_gpu:
        connector["kv_connector_module_path"] = "deepspec_vllm_shims.hidden_states"
    t0 = time.time()
    llm = LLM(
        model=req["target"],
        tokenizer=req["target"],
        dtype=req.get("dtype", "float32"),
        enforce_eager=bool(req.get("enforce_eager", not on_gpu)),
        max_model_len=int(req["max_model_len"]),
        tensor_parallel_size=int(req.get("tensor_parallel_size", 1)),
        seed=0,
        speculative_config={
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": req["aux_ids"]}},
        },
        kv_transfer_config=connector,
        # Every token's states are computed by this request's own forward, none served from
        # another request's cached prefix.
        enable_prefix_caching=False,
        trust_remote_code=bool(req.get("trust_remote_code", False)),
    )
    load_s = time.time() - t0
    params = SamplingParams(max_tokens=1, temperature=0.0)
    n_tokens = 0
    for part in req["parts"]:
        _wait_for_room(out_dir, int(req.get("max_pending", 2)), float(req.get("reader_timeout_s", 3600)))
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in part["sequences"]]
        outs = llm.generate(prompts, params, use_tqdm=False)
        states, lengths = [], []
        for ids, out in zip(part["sequences"], outs):
            path = (out.kv_transfer_params or {}).get("hidden_states_path")
            if not path:
                raise RuntimeError(f"vLLM returned no hidden_states_path for a request of {part['name']}")
            data = _read_states(path)
            got = data["token_ids"].tolist()
            if got != list(ids) or data["hidden_states"].shape[0] != len(ids):
                raise RuntimeError(
                    f"{part['name']}: vLLM's states cover {data['hidden_states'].shape[0]} tokens "
                    f"(ids {'equal' if got == list(ids) else 'differ'}), the sequence has {len(ids)}"
                )
            states.append(data["hidden_states"])
            lengths.append(len(ids))
        tmp = os.path.join(out_dir, part["name"] + ".partial")
        save_file({"hidden_states": torch.cat(states).contiguous(), "lengths": torch.tensor(lengths)}, tmp)
        os.replace(tmp, os.path.join(out_dir, part["name"] + ".safetensors"))
        n_tokens += sum(lengths)
    tmp = os.path.join(out_dir, "done.partial")
    with open(tmp, "w") as f:
        json.dump({"load_s": load_s, "run_s": time.time() - t0 - load_s, "tokens": n_tokens}, f)
    os.replace(tmp, os.path.join(out_dir, "done.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
