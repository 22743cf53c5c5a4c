"""The model zoo of the conformance test (tests/test_zoo.py) and its docs table.

Every entry builds a randomly initialised model (nothing is downloaded) at a small input
size, with the library's default configuration where that is small enough and a smaller
configuration of the same architecture otherwise (said in ``note``). Used by
``tests/test_zoo.py`` and ``docs/scripts/make_zoo_table.py``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to build it, the input it is probed on and where it comes from."""

    name: str
    source: str  # torchvision / torchvision detection / ... / timm / transformers / smp
    build: Callable[[], nn.Module]
    size: int = 64
    note: str = ""

    @property
    def available(self) -> bool:
        module = {
            "timm": "timm",
            "transformers": "transformers",
            "smp": "segmentation_models_pytorch",
        }
        need = module.get(self.source.split()[0], "torchvision")
        return importlib.util.find_spec(need) is not None


def _tv(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return tvm.get_model(name, weights=None, **kwargs)

    return build


def _maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    # maxvit_t's stages and widths; partition size 2 so that a 64 px input divides evenly.
    return MaxVit(
        input_size=(64, 64),
        stem_channels=64,
        partition_size=2,
        block_channels=[64, 128, 256, 512],
        block_layers=[2, 2, 5, 2],
        head_dim=32,
        stochastic_depth_prob=0.2,
    )


def _detection(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models.detection as tvd

        fn = getattr(tvd, name)
        return fn(weights=None, weights_backbone=None, min_size=64, max_size=64, **kwargs)

    return build


def _detection_fixed(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models.detection as tvd

        return getattr(tvd, name)(weights=None, weights_backbone=None)

    return build


def _segmentation(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models.segmentation as tvs

        return getattr(tvs, name)(weights=None, weights_backbone=None)

    return build


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _hf(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        if kind == "vit":
            cfg = tf.ViTConfig(
                image_size=64, patch_size=8, hidden_size=48, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=96,
            )  # fmt: skip
            return tf.ViTForImageClassification(cfg)
        if kind == "convnext":
            cfg = tf.ConvNextConfig(hidden_sizes=[12, 24, 40, 80], depths=[1, 1, 2, 1])
            return tf.ConvNextForImageClassification(cfg)
        if kind == "swin":
            cfg = tf.SwinConfig(
                image_size=64, patch_size=4, embed_dim=12, depths=[1, 1, 2],
                num_heads=[1, 2, 4], window_size=4,
            )  # fmt: skip
            return tf.SwinForImageClassification(cfg)
        cfg = tf.Dinov2Config(
            image_size=64, patch_size=8, hidden_size=48, num_hidden_layers=2,
            num_attention_heads=2, mlp_ratio=2,
        )  # fmt: skip
        return tf.Dinov2Model(cfg)

    return build


def _smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=2)


ZOO: list[Entry] = [
    # torchvision classification: one model per family
    Entry("alexnet", "torchvision", _tv("alexnet")),
    Entry("convnext_tiny", "torchvision", _tv("convnext_tiny")),
    Entry("densenet121", "torchvision", _tv("densenet121")),
    Entry("efficientnet_b0", "torchvision", _tv("efficientnet_b0")),
    Entry("efficientnet_v2_s", "torchvision", _tv("efficientnet_v2_s")),
    Entry("googlenet", "torchvision", _tv("googlenet", aux_logits=False, init_weights=False)),
    Entry(
        "inception_v3",
        "torchvision",
        _tv("inception_v3", aux_logits=False, init_weights=False),
        size=96,
        note="it accepts 75 px and up",
    ),
    Entry("maxvit_t", "torchvision", _maxvit, note="maxvit_t's widths, partition size 2"),
    Entry("mnasnet0_5", "torchvision", _tv("mnasnet0_5")),
    Entry("mobilenet_v2", "torchvision", _tv("mobilenet_v2")),
    Entry("mobilenet_v3_small", "torchvision", _tv("mobilenet_v3_small")),
    Entry("regnet_y_400mf", "torchvision", _tv("regnet_y_400mf")),
    Entry("resnet18", "torchvision", _tv("resnet18")),
    Entry("resnext50_32x4d", "torchvision", _tv("resnext50_32x4d")),
    Entry("shufflenet_v2_x0_5", "torchvision", _tv("shufflenet_v2_x0_5")),
    Entry("squeezenet1_0", "torchvision", _tv("squeezenet1_0")),
    Entry("swin_t", "torchvision", _tv("swin_t")),
    Entry("swin_v2_t", "torchvision", _tv("swin_v2_t")),
    Entry("vgg11", "torchvision", _tv("vgg11")),
    Entry("vit_b_16", "torchvision", _tv("vit_b_16", image_size=64), note="image_size=64"),
    # torchvision detection and segmentation
    Entry(
        "fasterrcnn_resnet50_fpn",
        "torchvision detection",
        _detection("fasterrcnn_resnet50_fpn"),
        note="min_size=max_size=64 (the transform resizes to that)",
    ),
    Entry(
        "retinanet_resnet50_fpn",
        "torchvision detection",
        _detection("retinanet_resnet50_fpn"),
        note="min_size=max_size=64",
    ),
    Entry(
        "fcos_resnet50_fpn",
        "torchvision detection",
        _detection("fcos_resnet50_fpn"),
        note="min_size=max_size=64",
    ),
    Entry(
        "ssdlite320_mobilenet_v3_large",
        "torchvision detection",
        _detection_fixed("ssdlite320_mobilenet_v3_large"),
        note="its transform resizes to 320 x 320",
    ),
    Entry("deeplabv3_resnet50", "torchvision segmentation", _segmentation("deeplabv3_resnet50")),
    Entry("fcn_resnet50", "torchvision segmentation", _segmentation("fcn_resnet50")),
    Entry(
        "lraspp_mobilenet_v3_large",
        "torchvision segmentation",
        _segmentation("lraspp_mobilenet_v3_large"),
    ),
    # timm
    Entry("resnet18", "timm", _timm("resnet18")),
    Entry("convnext_atto", "timm", _timm("convnext_atto")),
    Entry(
        "vit_tiny_patch16_224",
        "timm",
        _timm("vit_tiny_patch16_224", img_size=64),
        note="img_size=64",
    ),
    Entry(
        "swin_tiny_patch4_window7_224",
        "timm",
        _timm("swin_tiny_patch4_window7_224", img_size=64),
        note="img_size=64",
    ),
    Entry("efficientnet_b0", "timm", _timm("efficientnet_b0")),
    Entry("regnetx_002", "timm", _timm("regnetx_002")),
    Entry("mobilevit_xxs", "timm", _timm("mobilevit_xxs")),
    # Hugging Face transformers, small configurations
    Entry("ViTForImageClassification", "transformers", _hf("vit"), note="2 layers, width 48"),
    Entry(
        "ConvNextForImageClassification",
        "transformers",
        _hf("convnext"),
        note="widths 12-80, depths 1-1-2-1",
    ),
    Entry("SwinForImageClassification", "transformers", _hf("swin"), note="width 12, window 4"),
    Entry("Dinov2Model", "transformers", _hf("dinov2"), note="2 layers, width 48"),
    # segmentation-models-pytorch
    Entry("Unet(resnet18)", "smp", _smp_unet),
]


def make_input(entry: Entry, n: int = 2, seed: int = 0) -> torch.Tensor:
    """The probe batch of ``entry``: ``n`` standard-normal images of its size."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, entry.size, entry.size), generator=gen)
