"""make_touching_particles (public API): its arguments are checked in one line, valid calls give what it documents."""
import math

import numpy as np
import pytest

from gpu_pipeline import make_touching_particles
from gpu_pipeline._backend import DeclumpError


@pytest.mark.parametrize("argument,kwargs", [
    # Found by an audit: numpy's errors from deep inside, or silently an image without the particles asked for.
    ("n_particles", dict(n_particles=-3)),
    ("spacing", dict(spacing=(-1.0, 1.0))),
    ("radius_range", dict(radius_range=(-5, 2))),
    ("radius_range", dict(radius_range=(9, 5))),
    ("spacing", dict(shape=(16, 64, 64), spacing=(1.0, 1.0))),
    ("shape", dict(shape=(0, 64))),
    ("shape", dict(shape=(64,))),
    ("n_particles", dict(n_particles=2.5)),
    # The rest of what it takes.
    ("shape", dict(shape=(8, 8, 8, 8))),
    ("shape", dict(shape=(1, 64))),
    ("shape", dict(shape=(64.5, 64))),
    ("shape", dict(shape=64)),
    ("n_particles", dict(n_particles=True)),
    ("n_particles", dict(n_particles="5")),
    ("radius_range", dict(radius_range=(5,))),
    ("radius_range", dict(radius_range=5)),
    ("radius_range", dict(radius_range=(0, 4))),
    ("radius_range", dict(radius_range=(2, math.inf))),
    ("overlap", dict(overlap=1.0)),
    ("overlap", dict(overlap=-0.1)),
    ("overlap", dict(overlap=math.nan)),
    ("touching_fraction", dict(touching_fraction=1.5)),
    ("touching_fraction", dict(touching_fraction=-0.2)),
    ("spacing", dict(spacing=(0.0, 1.0))),
    ("spacing", dict(spacing=(1.0, math.nan))),
    ("spacing", dict(spacing=(1.0, 1.0, 1.0))),
    ("intensity_range", dict(intensity_range=(0.9, 0.2))),
    ("intensity_range", dict(intensity_range=(0.5, 1.5))),
    ("intensity_range", dict(intensity_range=(-0.1, 0.5))),
    ("intensity_range", dict(intensity_range=0.8)),
    ("background", dict(background=-0.1)),
    ("background", dict(background=1.2)),
    ("background", dict(background=None)),
    ("blur", dict(blur=-1.0)),
    ("blur", dict(blur=math.inf)),
    ("noise", dict(noise=-0.01)),
    ("noise", dict(noise="0.1")),
    ("polarity", dict(polarity="grey")),
    ("polarity", dict(polarity="auto")),
    ("polarity", dict(polarity=None)),
    ("rim", dict(rim=0)),
    ("rim", dict(rim=-2.0)),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=1.5)),
])
def test_each_bad_argument_is_a_one_line_error_naming_it(argument, kwargs):
    with pytest.raises(DeclumpError) as info:
        make_touching_particles(**{"shape": (64, 64), "n_particles": 5, **kwargs})
    message, given = str(info.value), kwargs[argument]
    assert message.startswith(f"{argument} must be") and "\n" not in message  # what it accepts
    assert repr(tuple(float(v) for v in given) if argument == "spacing" else given) in message  # what it got


def test_a_valid_call_gives_its_documented_image_and_labels(rng):
    shape, n = (96, 112), 20
    seed = int(rng.integers(1e6))
    image, labels = make_touching_particles(shape, n, seed=seed)
    assert image.shape == shape and image.dtype == np.uint8
    assert labels.shape == shape and labels.dtype == np.int32
    ids = np.unique(labels)
    assert ids[0] == 0 and 1 <= ids[-1] <= n and np.array_equal(ids, np.arange(ids[-1] + 1))  # 0, then 1..count
    first = [int(np.flatnonzero(labels.ravel() == i)[0]) for i in ids[1:]]
    assert first == sorted(first)  # numbered in C order of each one's first voxel
    inside, outside = image[labels > 0].mean(), image[labels == 0].mean()
    assert inside > outside + 100  # bright particles (0.75-1.0) on a background of 0.15
    again, again_labels = make_touching_particles(shape, n, seed=seed)
    assert np.array_equal(again, image) and np.array_equal(again_labels, labels)  # the same seed, the same bytes


def test_the_edges_of_each_range_and_numpy_numbers_are_accepted(rng):
    seed = np.int64(rng.integers(1e6))
    image, labels = make_touching_particles((np.int64(24), 40, 48), np.int32(10), radius_range=(6, 6), overlap=0.0,
                                            touching_fraction=1.0, spacing=np.array([2.0, 1.0, 1.0]),
                                            intensity_range=(1.0, 1.0), background=0.0, blur=0, noise=0,
                                            polarity="dark", rim=None, seed=seed)
    assert image.shape == labels.shape == (24, 40, 48) and 1 <= labels.max() <= 10
    assert set(np.unique(image[labels > 0])) == {0} and set(np.unique(image[labels == 0])) == {255}  # dark: 1 - x
    empty, none = make_touching_particles((32, 32), 0, seed=0)  # no particles: a background canvas
    assert empty.shape == (32, 32) and not none.any()


def test_anisotropic_spacing_makes_particles_round_in_physical_units(rng):
    """A sphere of radius 10 in voxels of (2, 1, 1) spans about 10 voxels along z and 20 along y and x."""
    for seed in rng.integers(1e6, size=50):
        _, labels = make_touching_particles((40, 80, 80), 1, radius_range=(10, 10), spacing=(2.0, 1.0, 1.0),
                                            seed=int(seed))
        where = np.nonzero(labels == 1)
        if all(w.min() > 0 and w.max() < s - 1 for w, s in zip(where, labels.shape)):  # not cut by the border
            break
    extent = [int(w.max() - w.min() + 1) for w in where]
    assert abs(extent[0] - 10) <= 2 and abs(extent[1] - 20) <= 2 and abs(extent[2] - 20) <= 2
