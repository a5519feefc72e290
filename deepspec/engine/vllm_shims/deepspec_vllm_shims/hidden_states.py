"""A KV connector for vLLM's ``extract_hidden_states`` method that also works without CUDA.

With ``speculative_config={"method": "extract_hidden_states", ...}`` vLLM stores the chosen target
layers' hidden states of every scheduled token in the KV cache of one extra cache-only layer; a KV
connector copies a finished request's slots out to a safetensors file (tensors ``hidden_states``
[tokens, layers, hidden] and ``token_ids``) and hands its path back in the request output's
``kv_transfer_params["hidden_states_path"]``. vLLM's own connector (``ExampleHiddenStatesConnector``)
copies through a CUDA stream into pinned host memory and marks completion with CUDA events, none of
which exist on a CPU-only machine. This subclass keeps its scheduling, file naming and lock protocol
and replaces only the copy: done synchronously on the device the cache lives on, the file written
to a temporary name and renamed, so a reader never sees half a file, then the lock released.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
)


class _Done:
    """Stands in for the CUDA event the parent class polls: the copy has already finished."""

    @staticmethod
    def query() -> bool:
        return True


class CPUHiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending) -> None:
        if not self._is_tp_rank_zero:  # every rank holds the same states; one writes them
            return
        assert self._kv_cache is not None
        bs = self._block_size
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs, dtype=torch.long)[None, :]).flatten()
        n = int(pending.token_ids.shape[0])
        slots = slots[:n].to(self._kv_cache.device)
        # The cache view is [blocks, layers, block_size, hidden]; a copy, since the blocks are
        # freed and reused once this request is reported done.
        states = self._kv_cache[slots // bs, :, slots % bs].to("cpu", copy=True).contiguous()
        os.makedirs(os.path.dirname(pending.filename) or ".", exist_ok=True)
        tmp = pending.filename + ".partial"
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        try:
            save_file({"hidden_states": states, "token_ids": pending.token_ids.clone()}, tmp)
            os.replace(tmp, pending.filename)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the exclusive lock a reader waits on
        self._req_copy_events[pending.req_id] = _Done()
