"""Markov heads: tensor names as DeepSpec loads them, and each step against values worked out by hand.

Formulas (docs/families.md, "Markov heads"): e = W1[x_{k-1}];
vanilla: bias = W2·e; gated: bias = W2·(σ(gate_proj([h; e])) ⊙ e);
rnn: [a; b; o] = joint_proj([s; e; h]), s' = σ(a) ⊙ s + (1 − σ(a)) ⊙ tanh(b), bias = W2·tanh(o).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from deepspec.models.heads import MarkovHead

V, R, H = 3, 2, 2


def _head(kind: str) -> MarkovHead:
    head = MarkovHead(SimpleNamespace(markov_rank=R, hidden_size=H, vocab_size=V, markov_head_type=kind))
    with torch.no_grad():
        head.markov_w1.weight.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.25], [-0.5, 1.5]]))
        head.markov_w2.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))  # [V, R]
        if kind == "gated":
            head.gate_proj.weight.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.4], [-0.5, 0.6, 0.0, 1.0]]))
            head.gate_proj.bias.copy_(torch.tensor([0.05, -0.1]))
        if kind == "rnn":
            w = torch.arange(36, dtype=torch.float32).reshape(6, 6) / 50.0 - 0.35
            head.joint_proj.weight.copy_(w)
            head.joint_proj.bias.copy_(torch.tensor([0.1, -0.1, 0.2, 0.0, -0.3, 0.05]))
    return head


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def matvec(w, x, b=None):
    return [sum(wi * xi for wi, xi in zip(row, x)) + (b[i] if b else 0.0) for i, row in enumerate(w)]


W1 = [[0.5, -1.0], [2.0, 0.25], [-0.5, 1.5]]
W2 = [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]


def test_tensor_names_and_shapes_are_deepspecs():
    golden = {
        "vanilla": {"markov_w1.weight": (V, R), "markov_w2.weight": (V, R)},
        "gated": {
            "markov_w1.weight": (V, R),
            "markov_w2.weight": (V, R),
            "gate_proj.weight": (R, H + R),
            "gate_proj.bias": (R,),
        },
        "rnn": {
            "markov_w1.weight": (V, R),
            "markov_w2.weight": (V, R),
            "joint_proj.weight": (3 * R, 2 * R + H),
            "joint_proj.bias": (3 * R,),
        },
    }
    for kind, names in golden.items():
        got = {k: tuple(v.shape) for k, v in _head(kind).state_dict().items()}
        assert got == names, kind


def test_vanilla_step_by_hand():
    head = _head("vanilla")
    bias, e, state = head.step(torch.tensor([1]), torch.zeros(1, H), None)
    want = matvec(W2, W1[1])  # [2.0, 0.25, 1.75]
    assert want == [2.0, 0.25, 1.75]
    torch.testing.assert_close(bias[0], torch.tensor(want))
    torch.testing.assert_close(e[0], torch.tensor(W1[1]))
    assert state is None


def test_gated_step_by_hand():
    head = _head("gated")
    h = [0.3, -0.7]
    e = W1[2]
    gw = [[0.1, -0.2, 0.3, 0.4], [-0.5, 0.6, 0.0, 1.0]]
    g = [sig(v) for v in matvec(gw, h + e, [0.05, -0.1])]  # input order [h; e]
    want = matvec(W2, [g[0] * e[0], g[1] * e[1]])
    bias, _, _ = head.step(torch.tensor([2]), torch.tensor([h]), None)
    torch.testing.assert_close(bias[0], torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_rnn_two_steps_by_hand():
    head = _head("rnn")
    jw = [[(6 * i + j) / 50.0 - 0.35 for j in range(6)] for i in range(6)]
    jb = [0.1, -0.1, 0.2, 0.0, -0.3, 0.05]
    hs = [[0.3, -0.7], [1.0, 0.5]]
    toks = [0, 2]
    s = [0.0, 0.0]  # s_0 = 0
    want_bias = []
    for tok, h in zip(toks, hs):
        proj = matvec(jw, s + W1[tok] + h, jb)  # input order [s; e; h]
        a, b, o = proj[0:2], proj[2:4], proj[4:6]  # split gate | candidate | output
        g = [sig(v) for v in a]
        s = [g[i] * s[i] + (1 - g[i]) * math.tanh(b[i]) for i in range(R)]
        want_bias.append(matvec(W2, [math.tanh(v) for v in o]))  # from the output part, not from s
    state = head.init_state(1, "cpu", torch.float32)
    for k in range(2):
        bias, _, state = head.step(torch.tensor([toks[k]]), torch.tensor([hs[k]]), state)
        torch.testing.assert_close(bias[0], torch.tensor(want_bias[k]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state[0], torch.tensor(s), rtol=1e-6, atol=1e-6)
    # The teacher-forced forward over the block gives the same biases.
    full, _ = head(torch.tensor([toks]), torch.tensor([hs]))
    torch.testing.assert_close(full[0], torch.tensor(want_bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["vanilla", "gated"])
def test_memoryless_forward_equals_steps(kind):
    head = _head(kind)
    prev = torch.tensor([[0, 2, 1]])
    h = torch.randn(1, 3, H, generator=torch.Generator().manual_seed(0))
    full, _ = head(prev, h)
    for k in range(3):
        b, _, _ = head.step(prev[:, k], h[:, k], None)
        torch.testing.assert_close(full[:, k], b)
