import pytest
import torch
import torch.nn.functional as F

from htc_lightning.models.necks.fpn import FPN


def test_fpn_outputs_five_levels_with_strides_and_p6_is_a_strided_max_pool_of_p5():
    fpn = FPN([8, 16, 32, 64], out_channels=12, num_outs=5, in_strides=[4, 8, 16, 32])
    feats = [torch.randn(2, c, 40 // 2**i, 48 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    outs = fpn(feats)
    assert [o.shape[-2:] for o in outs] == [(40, 48), (20, 24), (10, 12), (5, 6), (3, 3)]
    assert all(o.shape[:2] == (2, 12) for o in outs)
    assert fpn.strides == [4, 8, 16, 32, 64]
    assert torch.equal(outs[4], outs[3][:, :, ::2, ::2])


def test_fpn_top_down_upsamples_to_the_lower_levels_odd_size():
    fpn = FPN([4, 4], out_channels=4, num_outs=2)
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.weight.copy_(torch.eye(4)[:, :, None, None])
            conv.bias.zero_()
    lo, hi = torch.zeros(1, 4, 7, 5), torch.randn(1, 4, 4, 3)
    laterals = []
    fpn.fpn_convs[0].register_forward_hook(lambda m, i, o: laterals.append(i[0]))
    fpn([lo, hi])
    assert torch.equal(laterals[0], F.interpolate(hi, size=(7, 5), mode="nearest"))


def test_fpn_binds_to_the_backbone_channels_when_left_unset():
    fpn = FPN(out_channels=8)
    assert len(fpn.lateral_convs) == 0
    fpn.bind([3, 5, 7, 9], [4, 8, 16, 32])
    assert [c.in_channels for c in fpn.lateral_convs] == [3, 5, 7, 9]
    with pytest.raises(ValueError, match="in_channels"):
        fpn.bind([3, 5, 7, 10], [4, 8, 16, 32])
