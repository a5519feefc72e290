"""Run by test_eagle3_engines.py under torchrun (2 CPU processes, gloo). For an EAGLE-3 and a DSpark
drafter: shard it the way accelerate's FSDP2 does with the trainer's plugin (the policy from
``accelerate.utils.fsdp_utils``, then the root), train two AdamW steps, rebuild the final drafter with
``engine_state.final_drafter`` (what the trainer saves) and save / reload it as the native export.
Rank 0 compares it with a replica trained unsharded on the same batches; writes ``<out>/fsdp.json``."""

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import DistributedType
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from tiny_models import tiny_target
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from deepspec.config import DrafterConfig
from deepspec.exporting.native import load_native, save_native
from deepspec.exporting.writer import fixed_input, tolerance
from deepspec.models import build_drafter
from deepspec.models.config import resolve_drafter_config
from deepspec.training import engine_state
from deepspec.training.distributed import fsdp_plugin

V = 48


class Acc:  # the parts of an Accelerator that engine_state reads
    distributed_type = DistributedType.FSDP
    device = torch.device("cpu")

    def __init__(self):
        self.process_index = dist.get_rank()
        self.num_processes = dist.get_world_size()
        self.is_main_process = self.process_index == 0

    def unwrap_model(self, m):
        return m


def target():
    return tiny_target(vocab=V, tie_word_embeddings=False, initializer_range=0.3)


def drafter(kind: str, t):
    dc = DrafterConfig(
        kind=kind,
        num_layers=1 if kind == "eagle3" else 2,
        block_size=4,
        target_layer_ids=[0, 1, 2],
        markov_rank=8,
        attn_impl="sdpa",
    )
    d = build_drafter(resolve_drafter_config(dc, t.config.to_dict(), mask_token_id=V - 1))
    d.init_weights(std=0.1, seed=0)
    d.load_target_head(t.get_input_embeddings().weight, t.get_output_embeddings().weight)
    return d


def step(d, opt, seed: int) -> None:
    feats, ids, anchors, prev = fixed_input(d.config, seed=seed)
    out = d(feats, ids, anchors, prev)
    labels = torch.randint(0, V, out.logits.shape[:-1], generator=torch.Generator().manual_seed(seed))
    loss = F.cross_entropy(out.logits.flatten(0, -2).float(), labels.flatten())
    if out.confidence_logits is not None:
        loss = loss + out.confidence_logits.float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def shard(d, mesh) -> int:
    policy = fsdp2_prepare_auto_wrap_policy(fsdp_plugin(), d)
    units = [m for m in reversed(list(d.modules())) if policy is not None and policy(m)]
    for m in units:
        fully_shard(m, mesh=mesh)
    fully_shard(d, mesh=mesh)
    return len(units)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    acc = Acc()
    t = target()
    # the RunSetup fields final_drafter reads; a full-vocabulary drafter has no draft_ids
    run = SimpleNamespace(
        target=SimpleNamespace(embed_tokens=t.model.embed_tokens, lm_head=t.lm_head), draft_ids=None
    )
    results = {}
    for kind in ("eagle3", "dspark"):
        d = drafter(kind, t)
        before = {k: v.clone() for k, v in d.state_dict().items()}
        replica = copy.deepcopy(d)
        units = shard(d, mesh)
        opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2)
        ropt = torch.optim.AdamW(replica.trainable_parameters(), lr=1e-2)
        for seed in (1, 2):  # every rank the same batch: the averaged gradient is the replica's
            step(d, opt, seed)
            step(replica, ropt, seed)
        run.drafter_config = d.config
        final = engine_state.final_drafter(acc, run, d)  # collective
        if not acc.is_main_process:
            continue
        save_native(final, out / kind)  # bf16, as the trainer writes drafter/
        loaded = load_native(out / kind)
        x = fixed_input(final.config)
        with torch.no_grad():
            f, r, e = (m.eval()(*x).logits for m in (final, replica, loaded))
        scale = r.abs().max().item()
        results[kind] = {
            "shard_units": units,
            "final_class": type(final).__name__,
            "loaded_class": type(loaded).__name__,
            "loaded_kind": loaded.config.kind,
            "weights_moved": any(not torch.equal(v, before[k]) for k, v in final.state_dict().items()),
            "scale": scale,
            "final_vs_replica": (f - r).abs().max().item(),
            "export_vs_final": (e - f).abs().max().item(),
            "bf16_tolerance": tolerance("bfloat16", scale),
        }
    if acc.is_main_process:
        (out / "fsdp.json").write_text(json.dumps(results))
    # Leave together: a rank tearing gloo down while its peer is still writing can abort the peer.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
