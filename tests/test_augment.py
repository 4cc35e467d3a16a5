import math

import pytest
import torch

from utils.augment import RandomAugment, hflip, rotate, vflip, xl_augment
from utils.data import QuickDrawSet, split


def random_images(n=4, seed=0, channel=False):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 28, 28) if channel else (n, 28, 28)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def one_pixel(row, col):
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, row, col] = 1.0
    return image


def centroid(image):
    """(row, col) of the ink's centre of mass of a (1,1,H,W) image."""
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    weight = image[0, 0]
    return float((rows * weight).sum() / weight.sum()), float((cols * weight).sum() / weight.sum())


@pytest.mark.parametrize("channel", [False, True])
@pytest.mark.parametrize("degrees, k", [(90, 1), (-90, -1), (180, 2), (270, 3)])
def test_rotate_quarter_turns_equal_rot90(channel, degrees, k):
    x = random_images(channel=channel)
    expected = torch.rot90(x, k, dims=(-2, -1))
    out = rotate(x, degrees)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, expected)
    xf = x.float() / 255
    outf = rotate(xf, degrees)
    assert outf.dtype == torch.float32 and torch.allclose(outf, expected.float() / 255, atol=1e-5)


def test_rotate_by_zero_is_identity():
    x = random_images(channel=True)
    assert torch.equal(rotate(x, 0), x)
    xf = x.float() / 255
    assert torch.allclose(rotate(xf, 0), xf, atol=1e-5)


def test_rotate_accepts_one_angle_per_image():
    x = random_images(3)
    out = rotate(x, torch.tensor([0.0, 90.0, -90.0]))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], torch.rot90(x[1], 1))
    assert torch.equal(out[2], torch.rot90(x[2], -1))


@pytest.mark.parametrize("degrees", [30.0, -15.0, 15.0])
def test_rotated_pixel_lands_where_the_rotation_matrix_says(degrees):
    row, col, centre = 6, 20, 13.5  # pixel centres sit at integer + 0.5 of a canvas spanning 28
    out = rotate(one_pixel(row, col), degrees)
    a = math.radians(degrees)
    # Counter-clockwise as displayed, with rows growing downwards.
    dx, dy = col - centre, row - centre
    expected_col = centre + dx * math.cos(a) + dy * math.sin(a)
    expected_row = centre - dx * math.sin(a) + dy * math.cos(a)
    got_row, got_col = centroid(out)
    assert abs(got_row - expected_row) < 0.3 and abs(got_col - expected_col) < 0.3
    assert abs(float(out.sum()) - 1.0) < 0.05  # bilinear spreads the ink but keeps it on the canvas


def test_rotate_keeps_the_canvas_and_range_for_uint8():
    x = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    out = rotate(x, 15)
    assert out.shape == (2, 28, 28) and out.dtype == torch.uint8
    assert out[:, 14, 14].tolist() == [255, 255] and out[:, 0, 0].tolist() == [0, 0]  # corners leave the canvas


@pytest.mark.parametrize("channel", [False, True])
def test_flips_equal_torch_flip(channel):
    x = random_images(channel=channel)
    assert torch.equal(hflip(x), torch.flip(x, dims=(-1,)))
    assert torch.equal(vflip(x), torch.flip(x, dims=(-2,)))
    assert torch.equal(hflip(hflip(x)), x)


def test_rejects_images_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B,H,W\)"):
        rotate(torch.zeros(28, 28), 15)
    with pytest.raises(ValueError, match=r"\(2, 3, 28, 28\)"):
        hflip(torch.zeros(2, 3, 28, 28))


# --- xl_augment ------------------------------------------------------------------------------

def tiny_set(n=30, classes=3, seed=0):
    return QuickDrawSet(random_images(n, seed), torch.arange(n) % classes, [f"c{i}" for i in range(classes)])


def test_xl_augment_is_the_input_then_its_turned_and_flipped_copies():
    ds = tiny_set(10)
    xl = xl_augment(ds)
    assert len(xl) == 50 and xl.images.dtype == torch.uint8 and xl.classes == ds.classes
    assert torch.equal(xl.labels, ds.labels.repeat(5))
    blocks = xl.images.view(5, 10, 28, 28)
    expected = [ds.images, rotate(ds.images, -15), rotate(ds.images, 15), hflip(ds.images), vflip(ds.images)]
    for block, reference in zip(blocks, expected):
        assert torch.equal(block, reference)


def test_xl_augment_options_and_chunking():
    ds = tiny_set(10)
    xl = xl_augment(ds, angles=(90,), flips=("v",), chunk=3)  # chunks not dividing n
    assert len(xl) == 30
    assert torch.equal(xl.images[10:20], torch.rot90(ds.images, 1, dims=(-2, -1)))
    assert torch.equal(xl.images[20:], vflip(ds.images))
    assert torch.equal(xl_augment(ds, angles=(), flips=()).images, ds.images)
    with pytest.raises(ValueError, match="unknown flips"):
        xl_augment(ds, flips=("d",))


def test_xl_augment_of_train_split_holds_nothing_from_val_or_test():
    train, val, test = split(tiny_set(60, seed=1), seed=0)
    xl = xl_augment(train)
    held_out = torch.cat([val.images, test.images])
    # Every held-out drawing and each of its copies differs from everything in the XL set.
    copies = xl_augment(QuickDrawSet(held_out, torch.zeros(len(held_out), dtype=torch.int64), ["x"])).images
    same = (copies.flatten(1)[:, None] == xl.images.flatten(1)[None]).all(-1)  # (held-out copies, XL)
    assert not same.any()
    # And the XL set's originals are exactly the training drawings.
    assert torch.equal(xl.images[:len(train)], train.images)


# --- RandomAugment ---------------------------------------------------------------------------

def test_random_augment_keeps_shape_and_is_reproducible_under_a_seed():
    x = random_images(8, channel=True).float() / 255
    augment = RandomAugment(max_degrees=15, p_hflip=0.5, p_vflip=0.2, max_scale=0.1, max_shift=0.05)
    a = augment(x, generator=torch.Generator().manual_seed(0))
    b = augment(x, generator=torch.Generator().manual_seed(0))
    c = augment(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(2)
    d = augment(x)
    torch.manual_seed(2)
    assert torch.equal(d, augment(x))


def test_random_augment_draws_fresh_parameters_per_image():
    x = random_images(1, channel=True).float().expand(16, 1, 28, 28) / 255
    out = RandomAugment()(x, generator=torch.Generator().manual_seed(0))
    distinct = {tuple(img.flatten().tolist()) for img in out}
    assert len(distinct) == 16


def test_random_augment_turns_within_max_degrees():
    row, col, centre = 13, 24, 13.5  # a pixel to the right of the centre: its angle is the turn
    x = one_pixel(row, col).expand(64, 1, 28, 28)
    out = RandomAugment(max_degrees=15, p_hflip=0)(x, generator=torch.Generator().manual_seed(0))
    angles = []
    for image in out:
        r, c = centroid(image[None])
        angles.append(math.degrees(math.atan2(-(r - centre), c - centre)) - math.degrees(math.atan2(-(row - centre), col - centre)))
    assert max(abs(a) for a in angles) < 15.5
    assert max(angles) > 5 and min(angles) < -5  # both directions drawn


@pytest.mark.parametrize("kwargs, reference", [
    (dict(max_degrees=0, p_hflip=0), lambda x: x),
    (dict(max_degrees=0, p_hflip=1), hflip),
    (dict(max_degrees=0, p_hflip=0, p_vflip=1), vflip),
])
def test_random_augment_extremes_match_references(kwargs, reference):
    x = random_images(4, channel=True).float() / 255
    assert torch.allclose(RandomAugment(**kwargs)(x), reference(x), atol=1e-5)


def test_random_augment_is_identity_in_eval_mode():
    x = random_images(4, channel=True).float() / 255
    augment = RandomAugment(max_degrees=30, p_hflip=1).eval()
    assert augment(x) is x


def test_random_augment_rejects_bad_settings():
    with pytest.raises(ValueError, match="p_hflip"):
        RandomAugment(p_hflip=1.5)
    with pytest.raises(ValueError, match="max_scale"):
        RandomAugment(max_scale=1.0)
