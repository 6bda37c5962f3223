import numpy as np
import torch

from clipa.data.loader import TrainStream
from clipa.data.synthetic import CLASSNAMES, SyntheticEvalSet, SyntheticSource, eval_sample, train_sample
from clipa.data.transforms import train_transform
from clipa.recipe.schema import AugmentConfig


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


def _stream(micro=4, processes=2, **kw):
    tokenize = lambda caps, rngs=None: torch.tensor([[len(c)] for c in caps])  # noqa: E731 - stand-in tokenizer
    return TrainStream(SyntheticSource(seed=0, image_size=32), train_transform(16, AugmentConfig()), tokenize,
                       micro_batch=micro, processes=processes, **kw)


def test_stream_is_independent_of_workers_and_resumes_exactly():
    from torch.utils.data import DataLoader

    serial = [b for b in DataLoader(_stream(num_batches=6), batch_size=None, num_workers=0)]
    parallel = [b for b in DataLoader(_stream(num_batches=6), batch_size=None, num_workers=2)]
    resumed = [b for b in DataLoader(_stream(start_batch=3, num_batches=3), batch_size=None, num_workers=2)]
    assert len(serial) == len(parallel) == 6 and len(resumed) == 3
    for (xa, ta, _), (xb, tb, _) in zip(serial, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    for (xa, ta, _), (xb, tb, _) in zip(serial[3:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert not torch.equal(serial[0][0], serial[1][0])


def test_samples_and_augmentations_do_not_depend_on_the_batch_layout():
    """2 processes x micro 4 see exactly the 8 samples (same crops, same masks) of 1 process x micro 8."""
    mask = ("random", (2, 2), 0.5)
    whole = _stream(micro=8, processes=1, mask=mask).batch(1)
    rank0 = _stream(micro=4, processes=2, rank=0, mask=mask).batch(1)
    rank1 = _stream(micro=4, processes=2, rank=1, mask=mask).batch(1)
    for part in range(3):
        assert torch.equal(whole[part], torch.cat([rank0[part], rank1[part]]))
    # and 4 micro-batches of 2 on one process (accumulation) cover the same samples in order
    acc = [_stream(micro=2, processes=1, mask=mask).batch(b) for b in range(4, 8)]
    assert torch.equal(whole[0], torch.cat([a[0] for a in acc]))
    assert not torch.equal(rank0[0], rank1[0])
