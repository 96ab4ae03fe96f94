"""A researcher swaps a part of the detector from YAML by ``class_path``: HTC's mask head, the RoI sampler, the
RPN's assigner. The RoI head builds one part per stage with the class count linked from the data."""
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from htc_lightning.cli import HTCLightningCLI
from htc_lightning.data.synthetic import make_synthetic_coco
from htc_lightning.models.layers.assigners import MaxIoUAssigner
from htc_lightning.models.layers.samplers import RandomSampler
from htc_lightning.models.roi_heads import CascadeRoIHead, FCNMaskHead, Shared2FCBBoxHead

ROOT = Path(__file__).resolve().parents[1]
PARTS = "htc_lightning.models"


class DropoutMaskHead(FCNMaskHead):
    """A research variant: the stock mask head with dropout before the logits, one new argument."""

    def __init__(self, num_classes: int = 80, in_channels: int = 256, conv_channels: int = 256, num_convs: int = 4,
                 with_conv_res: bool = False, mask_size: int = 28, loss_weight: float = 1.0,
                 dropout: float = 0.1) -> None:
        super().__init__(num_classes, in_channels, conv_channels, num_convs, with_conv_res, mask_size, loss_weight)
        self.dropout = nn.Dropout2d(dropout)
        self.upsample = nn.Sequential(self.upsample, self.dropout)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("parts"), num_train=2, num_val=1, seed=4, image_size=(64, 64))


def swapped_config(tmp_path: Path) -> Path:
    """configs/tiny/htc_tiny_synthetic.yaml with the mask head, the RoI sampler and the RPN assigner replaced."""
    cfg = yaml.safe_load((ROOT / "configs/tiny/htc_tiny_synthetic.yaml").read_text())
    det = cfg["model"]["init_args"]["detector"]["init_args"]
    det["roi_head"]["init_args"]["mask_head"] = {"class_path": f"{__name__}.DropoutMaskHead",
                                                 "init_args": {"conv_channels": 32, "num_convs": 1, "dropout": 0.3}}
    det["roi_head"]["init_args"]["sampler"] = {"class_path": f"{PARTS}.layers.samplers.RandomSampler",
                                               "init_args": {"num": 32, "pos_fraction": 0.5}}
    det["rpn_head"]["init_args"]["assigner"] = {"class_path": f"{PARTS}.layers.assigners.MaxIoUAssigner",
                                                "init_args": {"pos_iou_thr": 0.6, "neg_iou_thr": 0.2}}
    path = tmp_path / "swapped.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_mask_head_sampler_and_assigner_are_swapped_from_yaml_and_train(tmp_path, coco):
    args = ["--config", str(swapped_config(tmp_path)), "--data.init_args.data_root", str(coco),
            "--data.init_args.train_scales", "[[64, 64]]", "--data.init_args.test_scale", "[64, 64]",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "out")]
    torch.manual_seed(0)
    cli = HTCLightningCLI(args=args, run=False)
    roi, rpn = cli.model.detector.roi_head, cli.model.detector.rpn_head
    num_classes = cli.datamodule.num_classes
    assert [type(h) for h in roi.mask_head] == [DropoutMaskHead] * 3
    # the class count comes from the data, the stage's wiring from the RoI head, the rest from the YAML
    assert all(h.num_classes == num_classes and h.dropout.p == 0.3 and len(h.convs) == 1 for h in roi.mask_head)
    assert [h.with_conv_res for h in roi.mask_head] == [False, True, True]
    assert (roi.sampler.num, roi.sampler.pos_fraction) == (32, 0.5)
    assert (rpn.assigner.pos_iou_thr, rpn.assigner.neg_iou_thr) == (0.6, 0.2)
    assert [a.pos_iou_thr for a in roi.assigners] == [0.5, 0.6, 0.7]  # the stage IoUs, not the RPN's

    cli.datamodule.setup("fit")
    images, targets = next(iter(cli.datamodule.train_dataloader()))
    losses = cli.model.detector.loss(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(h.conv_logits.weight.grad is not None for h in roi.mask_head)


def test_the_box_head_factory_gets_each_stage_its_own_target_stds():
    head = CascadeRoIHead(num_classes=3, in_channels=8, bbox_head=partial(Shared2FCBBoxHead, fc_out_channels=16),
                          mask_head=None, mask_info_flow=False)
    assert [h.coder.stds for h in head.bbox_head] == [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
                                                      (0.033, 0.033, 0.067, 0.067)]
    assert all(h.shared_fcs[0].in_features == 8 * 7 * 7 for h in head.bbox_head)  # the RoI extractor's 7x7


def test_a_part_built_for_another_class_count_is_an_error_naming_it():
    def fixed_80(num_classes, in_channels, **kw):
        return FCNMaskHead(80, in_channels, conv_channels=in_channels, **kw)

    with pytest.raises(ValueError, match=r"mask_head 0 \(FCNMaskHead\) was built for 80 classes, the RoI head for 3"):
        CascadeRoIHead(num_classes=3, in_channels=8, mask_head=fixed_80)


def test_a_mask_head_too_narrow_for_the_information_flow_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="set conv_channels=8"):
        CascadeRoIHead(num_classes=3, in_channels=8, mask_head=partial(FCNMaskHead, conv_channels=4))


def test_default_parts_are_mmdets_htc_settings():
    head = CascadeRoIHead()
    assert isinstance(head.sampler, RandomSampler)
    assert (head.sampler.num, head.sampler.pos_fraction, head.sampler.add_gt_as_proposals) == (512, 0.25, True)
    assert all(isinstance(a, MaxIoUAssigner) and a.match_low_quality for a in head.assigners)
    assert [a.min_pos_iou for a in head.assigners] == [0.5, 0.6, 0.7]
    assert (head.bbox_roi_extractor.output_size, head.mask_roi_extractor.output_size) == (7, 14)
