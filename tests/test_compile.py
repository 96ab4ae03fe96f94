"""``torch.compile`` (default mode, inductor) of the tiny HTC's towers: each compiles as one graph
(``fullgraph=True`` raises at the first graph break) and gives the eager outputs. The data-dependent glue
(assignment, sampling, NMS, per-level RoI grouping) stays eager by design; these are the dense parts that
carry the FLOPs. Tiny widths and inputs keep inductor's CPU compile to seconds per tower."""
from pathlib import Path

import pytest
import torch

from htc_lightning.tools.mmdet_parity import build_detector

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def det():
    torch.manual_seed(0)
    return build_detector(str(ROOT / "configs" / "parity" / "htc_tiny.yaml"),
                          ["backbone.init_args.pretrained=false"]).eval()


def assert_close(compiled, eager, rtol=1e-4, atol=1e-5):
    for c, e in zip(compiled, eager, strict=True):
        assert c.shape == e.shape
        assert (c - e).abs().max() <= rtol * e.abs().max() + atol


def compiled(module):
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True)


@torch.no_grad()
def test_backbone_and_neck_compile_as_one_graph_with_the_eager_features(det):
    images = torch.randn(1, 3, 64, 64)
    assert_close(compiled(det)(images), det(images))


@torch.no_grad()
def test_box_head_tower_compiles_as_one_graph_with_the_eager_outputs(det):
    head = det.roi_head.bbox_head[1]
    x = torch.randn(6, 32, 7, 7)
    assert_close(compiled(head)(x), head(x))


@torch.no_grad()
def test_mask_head_with_information_flow_compiles_as_one_graph_with_the_eager_outputs(det):
    head = det.roi_head.mask_head[2]
    x, res = torch.randn(3, 32, 14, 14), torch.randn(3, 32, 14, 14)
    assert_close(compiled(head)(x, res), head(x, res))


@torch.no_grad()
def test_semantic_head_and_rpn_tower_compile_as_one_graph_with_the_eager_outputs(det):
    feats = [torch.randn(1, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    assert_close(compiled(det.roi_head.semantic_head)(feats), det.roi_head.semantic_head(feats))
    cls, reg = compiled(det.rpn_head)(feats)
    ref_cls, ref_reg = det.rpn_head(feats)
    assert_close(cls + reg, ref_cls + ref_reg)
