"""Run by test_distributed.py under torchrun (2 CPU processes, gloo): FSDP2 (torch's fully_shard, which
accelerate uses on GPUs) shards a module with a frozen embedding and unevenly sized weights; the
engine-state helpers gather full weights and AdamW moments, and write them back into the shards."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from deepspec.training import engine_state


class Acc:  # the parts of an Accelerator that engine_state reads
    distributed_type = DistributedType.FSDP
    device = torch.device("cpu")

    def __init__(self):
        self.process_index = dist.get_rank()
        self.num_processes = dist.get_world_size()
        self.is_main_process = self.process_index == 0

    def unwrap_model(self, m):
        return m


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.emb.weight.requires_grad_(False)
        self.inner = torch.nn.Linear(8, 3)  # 3 rows over 2 ranks: uneven shards
        self.out = torch.nn.Linear(3, 1)  # a 1-element bias: one rank holds only padding

    def forward(self, x):
        return self.out(self.inner(self.emb(x))).pow(2).mean()


def step(m, opt):
    m(torch.tensor([[1, 2, 3], [4, 5, 6]])).backward()
    opt.step()
    opt.zero_grad()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    m = Net()
    fully_shard(m.inner, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    acc = Acc()
    step(m, opt)
    w = engine_state.full_weights(acc, m)
    moments, adam_step = engine_state.full_optimizer_state(acc, m, opt)
    box = [(w, moments)]
    dist.broadcast_object_list(box, src=0)  # the checkpoint every rank would read
    w, moments = box[0]
    step(m, opt)
    after_two = engine_state.full_weights(acc, m)
    with torch.no_grad():  # scramble, then restore the step-1 state and redo step 2
        for p in m.parameters():
            if p.requires_grad:
                p.mul_(0)
    opt.state.clear()
    engine_state.load_full_weights(acc, m, w)
    engine_state.load_full_optimizer_state(acc, m, opt, moments, adam_step)
    again = engine_state.full_weights(acc, m)
    step(m, opt)
    redone = engine_state.full_weights(acc, m)
    if acc.is_main_process:
        out.write_text(
            json.dumps(
                {
                    "shapes": {k: list(v.shape) for k, v in w.items()},
                    "adam_step": adam_step,
                    "restored": all(torch.equal(w[k], again[k]) for k in w),
                    "redone_equal": all(torch.equal(after_two[k], redone[k]) for k in after_two),
                }
            )
        )
    # Leave together: a rank tearing gloo down while its peer is still writing can abort the peer
    # ("terminate called without an active exception", seen once in a full-suite run).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
