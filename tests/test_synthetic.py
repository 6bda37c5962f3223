import numpy as np
import torch

from clipa.data.loader import TrainStream
from clipa.data.synthetic import CLASSNAMES, SyntheticEvalSet, SyntheticSource, eval_sample, train_sample
from clipa.data.transforms import train_transform


def pixels(image):
    return np.asarray(image)


def test_scenes_are_deterministic_per_seed_and_index():
    a_img, a_cap = train_sample(0, 123)
    b_img, b_cap = train_sample(0, 123)
    assert a_cap == b_cap and np.array_equal(pixels(a_img), pixels(b_img))
    c_img, c_cap = train_sample(1, 123)
    d_img, _ = train_sample(0, 124)
    assert not np.array_equal(pixels(a_img), pixels(c_img))
    assert not np.array_equal(pixels(a_img), pixels(d_img))


def test_captions_describe_the_main_object():
    for i in range(50):
        _, caption = train_sample(3, i)
        assert any(f"{name.split()[0]} " in caption and name.split()[1] in caption for name in CLASSNAMES)
    captions = {train_sample(0, i)[1] for i in range(200)}
    assert len(captions) > 150  # compositional variety, not a handful of strings


def test_eval_set_is_balanced_and_held_out():
    data = SyntheticEvalSet(per_class=3)
    labels = [data[i][1] for i in range(len(data))]
    assert len(CLASSNAMES) >= 20
    assert np.bincount(labels).tolist() == [3] * len(CLASSNAMES)
    train_pixels = {pixels(train_sample(0, i)[0]).tobytes() for i in range(len(data))}
    assert all(pixels(eval_sample(0, i)[0]).tobytes() not in train_pixels for i in range(len(data)))


def _stream(**kw):
    tokenize = lambda caps: torch.tensor([[len(c)] for c in caps])  # noqa: E731 - tiny stand-in tokenizer
    return TrainStream(SyntheticSource(seed=0, image_size=32), train_transform(16), tokenize,
                       micro_batch=4, global_batch=8, **kw)


def test_stream_is_independent_of_workers_and_resumes_exactly():
    from torch.utils.data import DataLoader

    serial = [b for b in DataLoader(_stream(num_batches=6), batch_size=None, num_workers=0)]
    parallel = [b for b in DataLoader(_stream(num_batches=6), batch_size=None, num_workers=2)]
    resumed = [b for b in DataLoader(_stream(start_batch=3, num_batches=3), batch_size=None, num_workers=2)]
    for (xa, ta), (xb, tb) in zip(serial, parallel):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    for (xa, ta), (xb, tb) in zip(serial[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    # different batches differ
    assert not torch.equal(serial[0][0], serial[1][0])


def test_ranks_see_disjoint_samples():
    a, b = _stream(rank=0), _stream(rank=1)
    assert not torch.equal(a.batch(0)[0], b.batch(0)[0])
    # rank 1's first batch is samples 4..7 of the source: same captions as an 8-wide rank-0 view
    whole = TrainStream(SyntheticSource(seed=0, image_size=32), train_transform(16),
                        lambda caps: torch.tensor([[len(c)] for c in caps]), micro_batch=8, global_batch=8)
    assert torch.equal(whole.batch(0)[1][4:], b.batch(0)[1])
