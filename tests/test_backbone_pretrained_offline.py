"""Backbone weights without internet: ``pretrained`` is true, false or a local file; a failed download is one
clear error whose first line names the backbone and both ways out, also through the CLI."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from htc_lightning.models.backbones.timm_backbone import PretrainedWeightsError, TimmBackbone

TINY = {"model_name": "resnet18", "model_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16},
        "frozen_stages": -1, "norm_eval": False}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(monkeypatch):
    """timm.create_model as it fails without internet when asked for pretrained weights."""
    create = timm.create_model

    def create_offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("An error happened while trying to locate the file on the Hub and we cannot find the "
                          "requested files in the local cache.")
        return create(*args, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_offline)


def test_pretrained_local_file_loads_every_tensor_and_reports_it(tmp_path, capsys):
    torch.manual_seed(0)
    source = TimmBackbone(**TINY)
    path = tmp_path / "resnet18_tiny.pth"
    # an ImageNet-style file: the backbone's tensors plus a classifier, which is ignored
    torch.save({**source.state_dict(), "fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)}, path)
    torch.manual_seed(1)
    loaded = TimmBackbone(**TINY, pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    report = capsys.readouterr().out
    assert f"loaded {len(source.state_dict())} of {len(source.state_dict())} tensors from {path}" in report
    assert "2 classifier entries ignored" in report


def test_pretrained_file_that_does_not_exist_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        TimmBackbone(**TINY, pretrained=str(tmp_path / "nowhere.pth"))


def test_failed_download_names_the_backbone_and_both_fixes_on_its_first_line(offline):
    with pytest.raises(PretrainedWeightsError) as info:
        TimmBackbone(**TINY, pretrained=True)
    first = str(info.value).splitlines()[0]
    assert first.startswith("TimmBackbone('resnet18'): cannot download the pretrained ImageNet weights")
    assert "local weights file" in first and "pretrained: false" in first
    assert "locate the file on the Hub" in str(info.value)  # the cause follows on the next line


def test_without_pretrained_weights_nothing_is_downloaded(offline):
    TimmBackbone(**TINY, pretrained=False)


def test_cli_reports_the_failed_download_alone_not_as_a_union_error(offline, tmp_path):
    from htc_lightning.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "configs/tiny/htc-without-semantic_tiny_coco.yaml"),
              "--data.init_args.data_root", str(REPO / "tests/fixtures/coco_tiny"),
              "--model.init_args.detector.init_args.backbone.init_args.pretrained", "true",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    message = str(info.value.code)
    assert message.startswith("error: TimmBackbone('resnet18'): cannot download the pretrained ImageNet weights")
    assert "Union" not in message and "Namespace(" not in message
