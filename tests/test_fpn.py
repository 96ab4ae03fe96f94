import pytest
import torch
import torch.nn.functional as F

from htc_lightning.models.interfaces import FeatureSpec
from htc_lightning.models.necks.fpn import FPN


def test_fpn_outputs_five_levels_with_strides_and_p6_is_a_strided_max_pool_of_p5():
    fpn = FPN(FeatureSpec((8, 16, 32, 64), (4, 8, 16, 32), 80), out_channels=12, num_outs=5)
    feats = [torch.randn(2, c, 40 // 2**i, 48 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    outs = fpn(feats)
    assert [o.shape[-2:] for o in outs] == [(40, 48), (20, 24), (10, 12), (5, 6), (3, 3)]
    assert all(o.shape[:2] == (2, 12) for o in outs)
    assert fpn.strides == [4, 8, 16, 32, 64]
    assert torch.equal(outs[4], outs[3][:, :, ::2, ::2])


def test_fpn_top_down_upsamples_to_the_lower_levels_odd_size():
    fpn = FPN(FeatureSpec((4, 4), (4, 8), 80), out_channels=4, num_outs=2)
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.weight.copy_(torch.eye(4)[:, :, None, None])
            conv.bias.zero_()
    lo, hi = torch.zeros(1, 4, 7, 5), torch.randn(1, 4, 4, 3)
    laterals = []
    fpn.fpn_convs[0].register_forward_hook(lambda m, i, o: laterals.append(i[0]))
    fpn([lo, hi])
    assert torch.equal(laterals[0], F.interpolate(hi, size=(7, 5), mode="nearest"))


def test_fpn_is_built_for_the_spec_it_is_given_and_rejects_fewer_outputs_than_inputs():
    fpn = FPN(FeatureSpec((3, 5, 7, 9), (8, 16, 32, 64), 80), out_channels=8, num_outs=6)
    assert [c.in_channels for c in fpn.lateral_convs] == [3, 5, 7, 9]
    assert fpn.strides == [8, 16, 32, 64, 128, 256]
    with pytest.raises(ValueError, match="num_outs=3 is smaller than the 4 input levels"):
        FPN(FeatureSpec((3, 5, 7, 9), (4, 8, 16, 32), 80), num_outs=3)
