"""The cosine ProtoNet head: prototypes are class means, logits are scale · cosine."""

import pytest
import torch

from amt.head import cosine_logits, protonet_logits, prototypes

from conftest import gen


def test_prototypes_are_class_means():
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    p = prototypes(f, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(p, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))


def test_missing_class_raises():
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        prototypes(torch.randn(3, 4), torch.tensor([0, 1, 1]), 3)


def test_cosine_logits_are_scaled_cosines_and_scale_invariant():
    g = gen(0)
    q, p = torch.randn(6, 8, generator=g), torch.randn(3, 8, generator=g)
    logits = cosine_logits(q, p, scale=10.0)
    expected = 10.0 * torch.tensor([[float(a @ b / (a.norm() * b.norm())) for b in p] for a in q])
    assert logits.shape == (6, 3)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert float(logits.abs().max()) <= 10.0 + 1e-5
    assert torch.allclose(cosine_logits(3 * q, 0.1 * p, 10.0), logits, atol=1e-5)
    scale = torch.tensor(4.0, requires_grad=True)  # a learnable scale receives a gradient
    cosine_logits(q, p, scale).sum().backward()
    torch.testing.assert_close(scale.grad, (logits / 10.0).sum(), atol=1e-5, rtol=1e-5)


def test_protonet_classifies_support_copies_correctly():
    g = gen(1)
    s = torch.randn(5, 16, generator=g)
    logits = protonet_logits(s, torch.arange(5), s + 0.01 * torch.randn(5, 16, generator=g), 5, 10.0)
    assert logits.argmax(-1).tolist() == list(range(5))
