import logging

import pytest
import torch

from amt.config import VariableEpisodeConfig
from amt.data.episodes import EpisodeError, FixedSampler, VariableSampler, load_episode

CLASSES = [list(range(c * 30, (c + 1) * 30)) for c in range(12)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_episodes_and_different_seed_differs():
    a = [FixedSampler(CLASSES, 5, 2, 4, _gen(3)).sample() for _ in range(1)]
    s1, s2 = FixedSampler(CLASSES, 5, 2, 4, _gen(3)), FixedSampler(CLASSES, 5, 2, 4, _gen(3))
    for _ in range(5):
        e1, e2 = s1.sample(), s2.sample()
        assert torch.equal(e1.support_indices, e2.support_indices)
        assert torch.equal(e1.query_indices, e2.query_indices)
    other = FixedSampler(CLASSES, 5, 2, 4, _gen(4)).sample()
    assert not torch.equal(a[0].query_indices, other.query_indices)


def test_fixed_episode_shape_disjoint_and_labels():
    sampler = FixedSampler(CLASSES, 5, 3, 7, _gen())
    for _ in range(20):
        e = sampler.sample()
        assert e.support_indices.numel() == 15 and e.query_indices.numel() == 35
        assert not set(e.support_indices.tolist()) & set(e.query_indices.tolist())
        assert sorted(set(e.support_labels.tolist())) == list(range(5))
        assert torch.bincount(e.query_labels).tolist() == [7] * 5
        assert len(set(e.class_ids.tolist())) == 5
        for idx, lab in zip(e.support_indices.tolist() + e.query_indices.tolist(),
                            e.support_labels.tolist() + e.query_labels.tolist()):
            assert idx // 30 == e.class_ids[lab]  # the image belongs to the class its label names


def test_small_classes_left_out_with_warning(caplog):
    classes = CLASSES[:6] + [list(range(1000, 1003))]
    with caplog.at_level(logging.WARNING):
        sampler = FixedSampler(classes, 5, 1, 5, _gen(), name="tiny")
    assert 6 not in sampler.classes and "left out 1 of 7" in caplog.text
    for _ in range(20):
        assert 6 not in sampler.sample().class_ids.tolist()


def test_too_few_classes_error_names_numbers():
    with pytest.raises(EpisodeError, match=r"only 2 of 12 classes have at least 30 images.*5 classes"):
        FixedSampler(CLASSES[:2] + [list(range(5))] * 10, 5, 1, 29, _gen())


def test_variable_sampler_respects_meta_dataset_limits():
    sizes = [8, 40, 300, 120, 60, 15, 200, 90, 33, 500, 47, 70]
    classes, start = [], 0
    for n in sizes:
        classes.append(list(range(start, start + n)))
        start += n
    sampler = VariableSampler(classes, VariableEpisodeConfig(max_ways=10), _gen(1))
    ways = set()
    for _ in range(60):
        e = sampler.sample()
        ways.add(e.n_way)
        assert 5 <= e.n_way <= 10
        assert e.support_indices.numel() <= 500
        s_counts = torch.bincount(e.support_labels, minlength=e.n_way)
        q_counts = torch.bincount(e.query_labels, minlength=e.n_way)
        assert int(s_counts.min()) >= 1 and int(s_counts.max()) <= 100
        assert int(q_counts.max()) <= 10 and len(set(q_counts.tolist())) == 1
        assert not set(e.support_indices.tolist()) & set(e.query_indices.tolist())
    assert len(ways) > 2


def test_load_episode_stacks_images():
    class Toy(torch.utils.data.Dataset):
        def __getitem__(self, i):
            return torch.full((3, 4, 4), float(i)), i // 30

    e = load_episode(Toy(), FixedSampler(CLASSES, 5, 1, 2, _gen()).sample())
    assert e.support_images.shape == (5, 3, 4, 4) and e.query_images.shape == (10, 3, 4, 4)
    assert e.n_way == 5
