"""A researcher's new proposal generator and new RoI head, written outside the package and plugged in from YAML
only: the Detector hands each the neck's widths and strides and the data's class count, and the CLI trains and
evaluates the result with COCO metrics. Nothing in htc_lightning names these classes."""
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align

from htc_lightning.cli import HTCLightningCLI
from htc_lightning.data.synthetic import make_synthetic_coco
from htc_lightning.models.interfaces import FeatureSpec, ProposalSettings
from htc_lightning.structures import Detections, to_original_frame

ROOT = Path(__file__).resolve().parents[1]


class SquareProposals(nn.Module):
    """Objectness per location of the finest level; a proposal is a square of ``box_size`` around each of the
    best locations."""

    def __init__(self, input: FeatureSpec, box_size: float = 24.0, train_num: int = 64, test_num: int = 32) -> None:
        super().__init__()
        self.stride, self.box_size = input.strides[0], box_size
        self.objectness = nn.Conv2d(input.channels[0], 1, 3, padding=1)
        self.train_settings = ProposalSettings(nms_pre=train_num, max_per_img=train_num)
        self.test_settings = ProposalSettings(nms_pre=test_num, max_per_img=test_num)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.objectness(feats[0])[:, 0]

    def _centres(self, h: int, w: int, device: torch.device) -> Tensor:
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        return (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * self.stride

    def loss(self, raw: Tensor, targets: list[dict], img_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        centres = self._centres(*raw.shape[-2:], raw.device)
        inside = []
        for t in targets:
            b = t["boxes"].to(raw.device)
            x, y = centres[:, :1], centres[:, 1:]
            hit = (x >= b[:, 0]) & (x <= b[:, 2]) & (y >= b[:, 1]) & (y <= b[:, 3])
            inside.append(hit.any(1).float())
        return {"loss_square_obj": F.binary_cross_entropy_with_logits(raw.flatten(1), torch.stack(inside))}

    def proposals(self, raw: Tensor, img_sizes: list[tuple[int, int]], settings: ProposalSettings) -> list[Tensor]:
        centres = self._centres(*raw.shape[-2:], raw.device)
        out = []
        for logits, (h, w) in zip(raw.detach().flatten(1), img_sizes):
            scores, idx = logits.sigmoid().topk(min(settings.max_per_img, logits.numel()))
            c = centres[idx]
            boxes = torch.cat([c - self.box_size / 2, c + self.box_size / 2], 1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append(torch.cat([boxes, scores[:, None]], 1))
        return out

    def merge_proposals(self, proposals):
        return torch.cat(list(proposals))[: self.test_settings.max_per_img]


class PooledClassifierHead(nn.Module):
    """Classifies each proposal from a 4x4 RoIAlign of the finest level; boxes are the proposals'."""

    with_mask = False
    with_semantic = False

    def __init__(self, input: FeatureSpec, hidden: int = 32) -> None:
        super().__init__()
        self.num_classes, self.stride = input.num_classes, input.strides[0]
        self.fc = nn.Linear(input.channels[0] * 16, hidden)
        self.cls = nn.Linear(hidden, input.num_classes + 1)  # background last, as the package's heads
        self.class_sized_parameters = ("cls.weight", "cls.bias")

    def _logits(self, feats: list[Tensor], proposals: list[Tensor]) -> Tensor:
        x = roi_align(feats[0], [p[:, :4] for p in proposals], 4, 1 / self.stride, aligned=True)
        return self.cls(F.relu(self.fc(x.flatten(1))))

    def loss(self, feats, proposals, targets, metrics=None) -> dict[str, Tensor]:
        labels = []
        for p, t in zip(proposals, targets):
            gt = t["boxes"].to(p)
            lab = torch.full((len(p),), self.num_classes, dtype=torch.long, device=p.device)
            if len(gt):
                iou, best = box_iou(p[:, :4], gt).max(1)
                lab = torch.where(iou >= 0.3, t["labels"].to(p.device)[best], lab)
            labels.append(lab)
        return {"loss_pooled_cls": F.cross_entropy(self._logits(feats, proposals), torch.cat(labels))}

    def predict(self, feats, proposals, metas, rescale: bool = True) -> list[Detections]:
        probs = self._logits(feats, proposals).softmax(-1)[:, :-1].split([len(p) for p in proposals])
        out = []
        for p, prob, meta in zip(proposals, probs, metas):
            scores, labels = prob.max(1)
            boxes = to_original_frame(p[:, :4], meta) if rescale else p[:, :4]
            out.append(Detections(boxes, scores, labels))
        return out


def test_a_new_proposal_generator_and_roi_head_train_and_evaluate_from_yaml_alone(tmp_path):
    coco = make_synthetic_coco(tmp_path / "coco", num_train=4, num_val=2, seed=3, image_size=(64, 64))
    cfg = yaml.safe_load((ROOT / "configs/tiny/htc_tiny_synthetic.yaml").read_text())
    det = cfg["model"]["init_args"]["detector"]["init_args"]
    det["rpn_head"] = {"class_path": f"{__name__}.SquareProposals", "init_args": {"box_size": 20.0}}
    det["roi_head"] = {"class_path": f"{__name__}.PooledClassifierHead", "init_args": {"hidden": 16}}
    cfg["trainer"].update(max_steps=3, val_check_interval=3, check_val_every_n_epoch=None, logger=False,
                          enable_progress_bar=False, default_root_dir=str(tmp_path / "run"))
    cfg["data"]["init_args"].update(data_root=str(coco), stuff_maps=None, train_scales=[[64, 64]],
                                    test_scale=[64, 64])
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))

    cli = HTCLightningCLI(args=["fit", "--config", str(path)])

    detector, num_classes = cli.model.detector, cli.datamodule.num_classes
    assert isinstance(detector.rpn_head, SquareProposals) and isinstance(detector.roi_head, PooledClassifierHead)
    # built for the neck's 32 channels at stride 4 and the data's class count, none of it in the YAML
    assert detector.rpn_head.objectness.in_channels == 32 and detector.rpn_head.stride == 4
    assert detector.roi_head.cls.out_features == num_classes + 1
    assert cli.model.default_iou_types() == ("bbox",)
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert "val/bbox_mAP" in metrics and 0.0 <= float(metrics["val/bbox_mAP"]) <= 1.0
    assert set(detector.class_sized_parameters) == {"roi_head.cls.weight", "roi_head.cls.bias"}
