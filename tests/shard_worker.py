"""Run by test_target_shard.py under torchrun (2 CPU processes, gloo): each target folder loaded whole
(``TargetModel.from_pretrained``) and with ``target.shard=fsdp`` (``load_sharded_target``: each rank
reads only its rows); features, logits, gathered weights and the per-rank parameter bytes of both.

argv: the output JSON, then one ``folder:dtype`` per target."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from deepspec.target.adapter import TargetModel
from deepspec.target.shard_load import load_sharded_target
from deepspec.target.sharding import local_param_bytes


def compare(folder: str, dtype: str, rank: int) -> dict:
    ids = [0, 2, 3]
    full = TargetModel.from_pretrained(folder, ids, dtype)
    sharded = load_sharded_target(folder, ids, dtype)
    g = torch.Generator().manual_seed(1)  # the same batch on both ranks, then a different one per rank
    x = torch.randint(0, full.vocab_size - 1, (2, 24), generator=g) + rank
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding on one row
    diffs = {}
    for _ in range(2):  # twice: reshard after the first forward must leave the next one right
        a, b = full(x, attention_mask=mask), sharded(x, attention_mask=mask)
        for name in ("aux", "final"):
            d = float((getattr(a, name) - getattr(b, name)).abs().max())
            diffs[name] = max(diffs.get(name, 0.0), d)
    diffs["logits"] = float((full.lm_head(a.final) - sharded.lm_head(b.final)).abs().max())
    diffs["embed"] = float((full.embed_tokens.weight - sharded.embed_tokens.weight).abs().max())
    diffs["lm_head"] = float((full.lm_head.weight - sharded.lm_head.weight).abs().max())
    return {
        "full_bytes": local_param_bytes(full.model),
        "shard_bytes": local_param_bytes(sharded.model),
        "diffs": diffs,
        "dtypes": sorted({str(p.dtype) for p in sharded.model.parameters()}),
        "tied": sharded.model.get_output_embeddings().weight is sharded.model.get_input_embeddings().weight,
        "aux_shape": list(b.aux.shape),
        "vocab": sharded.vocab_size,
        "hidden": sharded.hidden_size,
    }


def main(out: Path, targets: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res = {"rank": rank}
    for spec in targets:
        folder, dtype = spec.rsplit(":", 1)
        res[Path(folder).name] = compare(folder, dtype, rank)
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, res)
    if rank == 0:
        out.write_text(json.dumps(got))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
