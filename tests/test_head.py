import pytest
import torch

from amt.head import cosine_logits, prototypes, protonet_logits


def test_prototypes_are_class_means():
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    p = prototypes(f, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(p, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))


def test_missing_class_raises():
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        prototypes(torch.randn(3, 4), torch.tensor([0, 1, 1]), 3)


def test_cosine_logits_scale_bias_and_invariance():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(6, 8, generator=g), torch.randn(3, 8, generator=g)
    logits = cosine_logits(q, p, scale=10.0, bias=0.5)
    assert logits.shape == (6, 3)
    assert float(logits.max()) <= 15.0 + 1e-5 and float(logits.min()) >= -5.0 - 1e-5
    assert torch.allclose(cosine_logits(3 * q, 0.1 * p, 10.0, 0.5), logits, atol=1e-5)


def test_protonet_classifies_support_copies_correctly():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 16, generator=g)
    logits = protonet_logits(s, torch.arange(5), s + 0.01 * torch.randn(5, 16, generator=g), 5)
    assert logits.argmax(-1).tolist() == list(range(5))
