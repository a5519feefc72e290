"""Run by test_target_shard.py under torchrun (2 CPU processes, gloo): the same micro target loaded
whole and with ``target.shard=fsdp``; features, logits and the per-rank parameter bytes of both."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from deepspec.target.adapter import TargetModel
from deepspec.target.sharding import local_param_bytes, shard_target


def main(folder: str, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = [0, 2, 3]
    full = TargetModel.from_pretrained(folder, ids)
    sharded = TargetModel.from_pretrained(folder, ids)
    full_bytes = local_param_bytes(full.model)
    shard_target(sharded)
    shard_bytes = local_param_bytes(sharded.model)
    g = torch.Generator().manual_seed(1)  # the same batch on both ranks, then a different one per rank
    x = torch.randint(0, full.vocab_size, (2, 24), generator=g) + rank
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding on one row
    diffs = {}
    for _ in range(2):  # twice: reshard after the first forward must leave the next one right
        a, b = full(x, attention_mask=mask), sharded(x, attention_mask=mask)
        for name in ("aux", "final"):
            d = float((getattr(a, name) - getattr(b, name)).abs().max())
            diffs[name] = max(diffs.get(name, 0.0), d)
    logits_a = full.lm_head(a.final)
    logits_b = sharded.lm_head(b.final)
    diffs["logits"] = float((logits_a - logits_b).abs().max())
    diffs["embed"] = float((full.embed_tokens.weight - sharded.embed_tokens.weight).abs().max())
    diffs["lm_head"] = float((full.lm_head.weight - sharded.lm_head.weight).abs().max())
    res = {
        "rank": rank,
        "full_bytes": full_bytes,
        "shard_bytes": shard_bytes,
        "diffs": diffs,
        "aux_shape": list(b.aux.shape),
        "vocab": sharded.vocab_size,
        "hidden": sharded.hidden_size,
    }
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, res)
    if rank == 0:
        out.write_text(json.dumps(got))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
