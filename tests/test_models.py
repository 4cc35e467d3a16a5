import pytest
import torch

from utils.models import (MODELS, QuickDrawCNN_V1, QuickDrawCNN_V2, QuickDrawNet, build_model, count_parameters,
                          flops_per_image)


def param_counts(model):
    """Parameters per module that owns any, in definition order."""
    return [sum(p.numel() for p in m.parameters(recurse=False))
            for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def test_v2_matches_the_original_table_layer_by_layer():
    # conv 5x5, BN, conv 5x5, BN, conv 3x3, BN, linear 576->256, linear 256->10
    assert param_counts(QuickDrawCNN_V2(10)) == [416, 32, 12_832, 64, 18_496, 128, 147_712, 2_570]
    assert count_parameters(QuickDrawCNN_V2(10)) == 182_250


def test_v1_layers():
    # conv 1->16 5x5, conv 16->32 5x5, linear 1568->10
    assert param_counts(QuickDrawCNN_V1(10)) == [416, 12_832, 1568 * 10 + 10]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("n_classes", [2, 17])
def test_every_model_maps_a_batch_to_logits(name, n_classes):
    torch.manual_seed(0)
    model = build_model(name, n_classes).eval()
    x = torch.rand(3, 1, 28, 28)
    out = model(x)
    assert out.shape == (3, n_classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # each sample is classified on its own in eval mode: a batch of one gives the same logits
    torch.testing.assert_close(model(x[1:2]), out[1:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channels_last_gives_the_same_logits(name):
    torch.manual_seed(0)
    model = build_model(name, 5).eval()
    x = torch.rand(4, 1, 28, 28)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)


def test_v2_feature_map_is_64x3x3():
    assert QuickDrawCNN_V2(4).features(torch.zeros(2, 1, 28, 28)).shape == (2, 64, 3, 3)


def test_build_model_rejects_unknown_names_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'v3'.*v1.*v2"):
        build_model("v3", 10)
    with pytest.raises(ValueError, match="n_classes"):
        build_model("v2", 0)


def test_count_parameters_skips_frozen_ones():
    model = QuickDrawCNN_V1(10)
    model.features[0].weight.requires_grad_(False)  # 16*1*5*5 = 400 frozen
    assert count_parameters(model) == 416 + 12_832 + 15_690 - 400


def test_quickdrawnet_works_at_14_then_7_pixels():
    model = QuickDrawNet(17, widths=(8, 16), blocks=(2, 1)).eval()
    x = torch.rand(2, 1, 28, 28)
    assert model.stem(x).shape == (2, 8, 14, 14)
    assert model.stage1(model.stem(x)).shape == (2, 8, 14, 14)
    assert model.stage2(model.stage1(model.stem(x))).shape == (2, 16, 7, 7)
    assert len(model.stage1) == 2 and len(model.stage2) == 1 + 1  # residual blocks; downsample + block
    assert model(x).shape == (2, 17)


def test_quickdrawnet_stem_sees_every_pixel():
    # a 4x4 window with stride 2 and padding 1 overlaps its neighbours: each input pixel reaches the output,
    # through more than one window
    model = QuickDrawNet(3, widths=(4, 8)).eval()
    conv = model.stem[0]
    assert conv.kernel_size[0] > conv.stride[0] and conv.kernel_size[1] > conv.stride[1]
    x = torch.zeros(1, 1, 28, 28, requires_grad=True)
    model.stem[0](x).sum().backward()
    assert (x.grad != 0).all()


def test_flops_per_image_counts_multiply_adds_twice():
    # V1 by hand: conv 1->16 5x5 at 28x28, conv 16->32 5x5 at 14x14, linear 1568->10
    macs = 16 * 25 * 28 * 28 + 16 * 32 * 25 * 14 * 14 + 1568 * 10
    model = QuickDrawCNN_V1(10).train()
    assert flops_per_image(model) == 2 * macs
    assert model.training  # its mode is left as found
    qdnet = build_model("qdnet", 17)
    stats = qdnet.stem[1].running_mean.clone()
    flops_per_image(qdnet)
    assert torch.equal(qdnet.stem[1].running_mean, stats)  # and its BatchNorm statistics
    # no layer at 28x28 is what QuickDrawNet saves: under half the ResNet's FLOPs
    assert flops_per_image(build_model("qdnet", 17)) < 0.5 * flops_per_image(build_model("resnet", 17))


def test_quickdrawnet_predicts_a_drawing_and_its_mirror_alike():
    torch.manual_seed(0)
    model = QuickDrawNet(5, widths=(8, 16)).eval()
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), (model.logits(x) + model.logits(x.flip(-1))) / 2)
    torch.testing.assert_close(model(x.flip(-1)), model(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.logits(x.flip(-1)), model.logits(x))  # the network alone is not symmetric
    model.train()
    outputs = []
    for f in (model, model.logits):
        torch.manual_seed(1)  # the same dropout mask
        outputs.append(f(x))
    torch.testing.assert_close(*outputs)  # training sees one image per drawing
