import pytest
import torch

from kdq.models import CifarMobileNetV2, build_model, count_parameters


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("resnet20", 0.27e6),
        ("resnet56", 0.856e6),
        ("resnet18", 11.17e6),
        ("resnet50", 23.52e6),
        ("resnet152", 58.16e6),
        ("mobilenet_v2", 2.24e6),
    ],  # fmt: skip
)
def test_parameter_counts(arch, expected):
    assert count_parameters(build_model(arch, 10)) == pytest.approx(expected, rel=0.01)


def test_cifar_stem_keeps_resolution():
    teacher = build_model("resnet18", 10)
    assert teacher.conv1.stride == (1, 1) and isinstance(teacher.maxpool, torch.nn.Identity)
    student = build_model("mobilenet_v2", 10)
    assert student.features[0][0].stride == (1, 1)
    assert build_model("mobilenet_v2", 7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_resnet_has_he_et_al_layout():
    """Depth 6n+2: stem + 3 stages of n basic blocks (2 convs each) + fc; 16/32/64 channels, 8x8 final maps."""
    m = build_model("resnet56", 10)
    assert sum(isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3) for x in m.modules()) == 55
    assert m.layers(m.stem(torch.randn(1, 3, 32, 32))).shape == (1, 64, 8, 8)
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("resnet20", 10).__class__(21)


def test_student_is_ready_for_eager_quantization():
    m = CifarMobileNetV2(10, width_mult=0.5)
    assert not any(isinstance(x, torch.nn.ReLU6) for x in m.modules())  # no conv-bn-ReLU6 fusion exists
    m.eval().fuse_model(is_qat=False)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # every BN folded


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="resnet152.*mobilenet_v2"):
        build_model("vgg", 10)


@pytest.mark.parametrize(
    "arch,legacy,final_maps,mmacs",
    [("mobilenet_v2", "mobilenet_v2_os16", 2, 24.5), ("mobilenet_v2_hires", "mobilenet_v2_os8", 4, 88)],
)
def test_student_layouts_hold_their_names_at_every_size(arch, legacy, final_maps, mmacs):
    """mobilenet_v2 keeps torchvision's strides but the CIFAR stem's (2x2 final maps at 32 px); the hires layout
    also keeps the 24-channel stage at stride 1 (4x4), the published CIFAR MobileNetV2 layout: 3.6x the
    multiply-accumulates, the same parameters. Above 64 px (the ImageNet stem) both double their output stride
    and hires' maps stay 2x finer: the names say nothing that stops being true."""
    from kdq.models import model_macs

    m = build_model(arch, 10).eval()
    assert m.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (final_maps, final_maps)
    big = build_model(arch, 10, stem="imagenet").eval()
    assert big.features(torch.randn(1, 3, 96, 96)).shape[-1] == 3 * final_maps // 2  # 96 / 32 and 96 / 16
    old = build_model(legacy, 10).eval()  # checkpoints from before the rename still load as the same layout
    assert old.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (final_maps, final_maps)
    assert model_macs(m)["macs_per_image"] / 1e6 == pytest.approx(mmacs, rel=0.03)
    assert count_parameters(m) == pytest.approx(2.24e6, rel=0.01)


def test_the_demo_student_is_smaller_than_its_teacher_in_parameters_and_work():
    """README's figures for `make demo`'s pair: a ResNet-8 student with 0.08 M parameters and 12.5 M multiply-adds,
    3.5x and 3.3x fewer than its ResNet-20 teacher's 0.27 M and 41 M."""
    from kdq.models import model_macs
    from kdq.presets import get_preset

    demo = get_preset("demo")
    assert (demo.teacher, demo.student) == ("resnet20", "resnet8")
    teacher, student = build_model(demo.teacher, 10).eval(), build_model(demo.student, 10).eval()
    t_macs, s_macs = (model_macs(m)["macs_per_image"] / 1e6 for m in (teacher, student))
    t_params, s_params = (count_parameters(m) / 1e6 for m in (teacher, student))
    assert round(t_macs) == 41 and round(s_macs, 1) == 12.5
    assert round(t_params, 2) == 0.27 and round(s_params, 2) == 0.08
    assert round(t_macs / s_macs, 1) == 3.3 and round(t_params / s_params, 1) == 3.5
