"""``train.compile=true``: the compiled drafter trains to the same gradients and keeps its parameter
names (exports unchanged). Uses the "eager" dynamo backend so the test needs no C++ toolchain."""

from __future__ import annotations

import torch
from tiny_models import tiny_target

from deepspec.config import DrafterConfig, LossConfig, TrainConfig
from deepspec.data.anchors import block_targets
from deepspec.losses import dspark_loss, target_logits, weighted_valid
from deepspec.models import build_drafter
from deepspec.models.config import resolve_drafter_config
from deepspec.target.adapter import TargetModel
from deepspec.training.setup import maybe_compile

V = 64


def test_compiled_drafter_same_grads_and_names():
    t = tiny_target(vocab=V)
    c = resolve_drafter_config(
        DrafterConfig(num_layers=1, block_size=4, target_layer_ids=[0, 1, 2], markov_rank=8),
        t.config.to_dict(),
        mask_token_id=V - 1,
    )
    ref = build_drafter(c)
    ref.init_weights(0.1, seed=0)
    ref.load_target_head(t.get_input_embeddings().weight, t.get_output_embeddings().weight)
    comp = build_drafter(c)
    comp.load_state_dict(ref.state_dict())
    for p in (comp.embed_tokens.weight, comp.lm_head.weight):
        p.requires_grad_(False)
    maybe_compile(comp, TrainConfig(compile=False))
    assert comp._compiled_call_impl is None
    maybe_compile(comp, TrainConfig(compile=True, compile_backend="eager"))
    assert comp._compiled_call_impl is not None
    assert list(comp.state_dict()) == list(ref.state_dict())

    ids = torch.randint(0, V - 1, (2, 16))
    anchors = torch.tensor([[3, 7, 11], [2, 7, 12]])
    tm = TargetModel(t, c.target_layer_ids)
    f = tm(ids)
    tg = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), 4)
    tgt = target_logits(f.final, tg.target_pos, tm.lm_head)
    grads = []
    for m in (ref, comp):
        o = m(f.aux, ids, anchors, tg.prev_tokens)
        dspark_loss(
            o.logits, o.confidence_logits, tgt, tg, LossConfig(), weighted_valid(tg.valid, 4.0).sum()
        ).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
