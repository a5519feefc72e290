"""Target features from vLLM (``collect.backend=vllm``, docs/engine.md "Target features from vLLM").

For targets that need tensor or expert parallelism, vLLM shards the target and deepspec trains on
its features: vLLM's ``method="extract_hidden_states"`` returns the hidden states of chosen layers
for every prompt token (:mod:`deepspec.engine.vllm_features_worker`, run in the vLLM environment).

Layer ids, three conventions for the same tensors (pinned by tests/test_engine.py):

| what | deepspec layer id ``k`` (``model.target_layer_ids``) | vLLM aux id | HF ``hidden_states`` index |
| --- | --- | --- | --- |
| embeddings | -1 | 0 | 0 |
| output of decoder layer k (residual stream, before the final norm) | k | k + 1 | k + 1, except the last layer |
| final-norm hidden (the lm_head input, the cache's ``final``) | – | final norm of aux ``num_layers`` | ``num_layers`` |

HF's last ``hidden_states`` entry is the *normed* output (so HF index ``num_layers`` is deepspec's
``final``, not layer ``num_layers - 1``); vLLM's aux id ``num_layers`` is the raw output of the last
layer, to which deepspec applies the target's own final norm (:class:`deepspec.target.parts.TargetParts`).
vLLM returns the aux states in ascending layer order with each id once, whatever order the config
lists them in, so the ids are requested sorted and deduplicated and mapped back here.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from deepspec.engine.procs import EngineError, log_tail, started

WORKER = Path(__file__).resolve().parent / "vllm_features_worker.py"


@dataclass(frozen=True)
class AuxLayout:
    aux_ids: List[int]  # what vLLM is asked for: sorted, each once
    layer_rows: List[int]  # for each deepspec layer id (in the drafter's order), its row in aux_ids
    final_row: int  # the row holding the last layer's raw output (input of the final norm)


def vllm_aux_id(layer_id: int) -> int:
    """deepspec layer id (-1 = embeddings, k = output of decoder layer k) -> vLLM aux id."""
    return int(layer_id) + 1


def hf_hidden_states_index(layer_id: int, num_layers: int) -> int:
    """deepspec layer id -> index into HF's ``output_hidden_states``; the last layer has none
    (HF's last entry is already normed)."""
    if int(layer_id) >= num_layers - 1:
        raise ValueError(
            f"layer {layer_id}: HF's hidden_states[{num_layers}] is the final-norm output, not the raw "
            f"output of the last layer ({num_layers - 1})"
        )
    return int(layer_id) + 1


def aux_layout(layer_ids: Sequence[int], num_layers: int) -> AuxLayout:
    from deepspec.models.config import check_layer_ids

    check_layer_ids(list(layer_ids), num_layers)
    wanted = sorted({vllm_aux_id(i) for i in layer_ids} | {num_layers})
    row = {a: r for r, a in enumerate(wanted)}
    return AuxLayout(wanted, [row[vllm_aux_id(i)] for i in layer_ids], row[num_layers])


def split_states(states: torch.Tensor, layout: AuxLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """vLLM's [T, len(aux_ids), H] -> (aux [T, n·H] in the drafter's layer order, last-layer raw [T, H])."""
    if states.dim() != 3 or states.shape[1] != len(layout.aux_ids):
        raise EngineError(
            f"vLLM returned hidden states of shape {tuple(states.shape)}; expected [tokens, "
            f"{len(layout.aux_ids)} layers (aux ids {layout.aux_ids}), hidden]"
        )
    aux = states[:, layout.layer_rows].reshape(states.shape[0], -1)
    return aux, states[:, layout.final_row]


class VllmFeatureSource:
    """Hidden states of the given parts of sequences, read as the worker finishes them.

    Use as a context manager: the worker (and every helper process vLLM starts) is stopped by its
    process id on leaving the block, on success, error or interrupt (deepspec.engine.procs)."""

    def __init__(
        self,
        target_dir: str,
        parts: Dict[str, List[List[int]]],
        layout: AuxLayout,
        work_dir: Path,
        *,
        dtype: str = "float32",
        tensor_parallel_size: int = 1,
        trust_remote_code: bool = False,
        vllm_python: Optional[str] = None,
        setup: bool = True,
        stall_timeout_s: float = 1800.0,
        log=print,
    ) -> None:
        self.parts, self.layout, self.work = parts, layout, Path(work_dir)
        self.stall_timeout_s = stall_timeout_s
        self.out = self.work / "parts"
        self.log_path = self.work / "vllm-features.log"
        longest = max((len(s) for seqs in parts.values() for s in seqs), default=1)
        self.request = {
            "target": str(target_dir),
            "dtype": dtype,
            "tensor_parallel_size": int(tensor_parallel_size),
            "trust_remote_code": bool(trust_remote_code),
            "aux_ids": layout.aux_ids,
            # Room for the longest sequence and the one token generated after it.
            "max_model_len": 32 * math.ceil((longest + 1) / 32),
            "out_dir": str(self.out),
            "parts": [{"name": n, "sequences": s} for n, s in parts.items()],
            "max_pending": 2,
        }
        self.vllm_python, self.setup, self.log = vllm_python, setup, log
        self._stack: Optional[contextlib.ExitStack] = None
        self.proc = None
        self.python = vllm_python

    def __enter__(self) -> VllmFeatureSource:
        from deepspec.engine.vllm_env import engine_env, find_vllm_python

        python = self.python = find_vllm_python(self.vllm_python, setup=self.setup, log=self.log)
        shutil.rmtree(self.out, ignore_errors=True)  # parts of an interrupted earlier start are not ours
        self.out.mkdir(parents=True)
        req_path = self.work / "vllm-features-request.json"
        req_path.write_text(json.dumps(self.request))
        self.log_path.unlink(missing_ok=True)
        self._stack = contextlib.ExitStack()
        # The default CPU runner (no Triton, no Model Runner V2) runs extract_hidden_states.
        self.proc = self._stack.enter_context(
            started([python, str(WORKER), str(req_path)], engine_env(spec_decode=False), self.log_path)
        )
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._stack is None:
            return
        if exc_type is None and self.proc is not None:
            # Every part is read: let vLLM shut down on its own before the stop that always follows.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(120)
        self._stack.close()

    def _exit_message(self, name: str) -> str:
        tail = log_tail(self.log_path)
        msg = f"vLLM feature worker exited (code {self.proc.returncode}) before writing {name}: {tail}"
        if "No module named 'vllm'" in tail:
            from deepspec.engine.vllm_env import default_env_dir, install_hint

            msg = f"{install_hint(default_env_dir())} ({self.python} has no vLLM)"
        return f"{msg}; full log: {self.log_path}"

    def get(self, name: str) -> List[torch.Tensor]:
        """Part ``name``'s states, one [tokens, aux ids, H] tensor per sequence (waits for the worker)."""
        from safetensors.torch import load_file

        path = self.out / f"{name}.safetensors"
        deadline = time.monotonic() + self.stall_timeout_s
        while not path.is_file():
            if self.proc.poll() is not None:
                raise EngineError(self._exit_message(name))
            if time.monotonic() > deadline:
                raise EngineError(
                    f"vLLM wrote no features for {name} within {self.stall_timeout_s:.0f} s "
                    f"(collect.vllm_timeout_s); read {self.log_path}"
                )
            time.sleep(0.2)
        data = load_file(str(path))
        path.unlink()  # lets the worker go on with the next part
        lengths = data["lengths"].tolist()
        want = [len(s) for s in self.parts[name]]
        if lengths != want:
            raise EngineError(f"vLLM features of {name}: sequence lengths {lengths}, expected {want}")
        return list(torch.split(data["hidden_states"], lengths))


def iter_shard_features(
    source: VllmFeatureSource, name: str, final_norm, batch_size: int
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(aux [t, n·H], final [t, H]) per ``batch_size`` sequences of part ``name``, the grouping the
    HF collector encodes in."""
    per_seq = source.get(name)
    for c in range(0, len(per_seq), batch_size):
        states = torch.cat(per_seq[c : c + batch_size])
        aux, last = split_states(states, source.layout)
        with torch.no_grad():
            yield aux, final_norm(last)
