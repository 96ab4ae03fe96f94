"""Every config in configs/ parses (``--print_config``), builds through the CLI, and runs a training step
(forward + backward) and a prediction at tiny size on synthetic data."""
import importlib
from pathlib import Path

import pytest
import torch
import yaml

from htc_lightning.cli import HTCLightningCLI, main
from htc_lightning.data.synthetic import make_synthetic_coco

ROOT = Path(__file__).resolve().parents[1]
# fragments without a model class (configs/cluster/precision_16-mixed_cpu.yaml, configs/recipes/) are stacked on
# a full config: their own tests use them so
CLI_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                     if p.parent.name not in ("parity",)
                     and "class_path" in (yaml.safe_load(p.read_text()).get("model") or {}))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("cfg"), num_train=2, num_val=1, seed=3, image_size=(64, 64))


def _overrides(path: str, root: Path) -> list[str]:
    parts = yaml.safe_load((ROOT / path).read_text())["model"]["init_args"]["detector"]["init_args"]
    backbone = parts["backbone"]
    det = "--model.init_args.detector.init_args"
    # the same modules at their full widths, with small RoI budgets so that a step stays cheap on CPU
    budgets = [f"{det}.rpn_head.init_args.train_max_per_img", "100", f"{det}.rpn_head.init_args.test_max_per_img", "50"]
    if parts.get("roi_head"):
        budgets += [f"{det}.roi_head.init_args.sampler", '{"class_path": "htc_lightning.models.layers.samplers.'
                    'RandomSampler", "init_args": {"num": 64, "pos_fraction": 0.25}}',
                    f"{det}.roi_head.init_args.max_per_img", "10"]
    # no downloads here: ImageNet weights are replaced by random ones
    no_download = (["--model.init_args.detector.init_args.backbone.init_args.pretrained", "false"]
                   if backbone["init_args"].get("pretrained") else [])
    return ["--config", str(ROOT / path), "--data.init_args.data_root", str(root),
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "1",
            "--data.init_args.train_scales", "[[64, 64]]", "--data.init_args.train_short_range", "null",
            "--data.init_args.test_scale", "[64, 64]", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(root / "out"), *no_download,
            # on this CPU machine: the cluster config's 2 x 8 GPUs become one CPU process
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
            "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--trainer.plugins", "null", *budgets]


def _part(detector_args: dict, slot: str) -> type | None:
    """The class a config puts in a Detector slot (None when the slot is off)."""
    spec = detector_args.get(slot)
    if spec is None:
        return None
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_every_backbone_and_proposal_generator_has_a_config_and_so_has_a_proposal_only_detector():
    from htc_lightning.models.backbones import FishNet, TimmBackbone
    from htc_lightning.models.proposals.ga_rpn import GARPN
    from htc_lightning.models.proposals.rpn import RPN
    from htc_lightning.models.roi_heads import CascadeRoIHead

    detectors = [yaml.safe_load((ROOT / p).read_text())["model"]["init_args"]["detector"]["init_args"]
                 for p in CLI_CONFIGS]
    used = {slot: {_part(d, slot) for d in detectors} for slot in ("backbone", "rpn_head", "roi_head")}
    assert {FishNet, TimmBackbone} <= used["backbone"]
    assert {RPN, GARPN} <= used["rpn_head"]
    assert {CascadeRoIHead, None} <= used["roi_head"]  # a two-stage detector, and GA-RPN alone


@pytest.mark.parametrize("path", CLI_CONFIGS)
def test_print_config_parses(path, coco, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_overrides(path, coco), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["detector"]["class_path"].endswith("Detector")


@pytest.mark.slow
@pytest.mark.parametrize("path", CLI_CONFIGS)
def test_config_builds_and_runs_a_training_step_and_a_prediction(path, coco):
    torch.manual_seed(0)
    cli = HTCLightningCLI(args=_overrides(path, coco), run=False)
    detector, dm = cli.model.detector, cli.datamodule
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    detector.train()
    losses = detector.loss(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in detector.backbone.parameters())
    detector.eval()
    images, targets = next(iter(dm.val_dataloader()))
    dets = detector.predict(images, [t["meta"] for t in targets])
    assert len(dets) == len(targets)


def test_generated_configs_are_what_the_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", ROOT / "configs" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    stale = [rel for rel, (comment, cfg) in generate.configs().items()
             if not (ROOT / "configs" / f"{rel}.yaml").is_file()
             or (ROOT / "configs" / f"{rel}.yaml").read_text() != generate.render(comment, cfg)]
    assert not stale, f"configs/generate.py and configs/ have drifted; run python configs/generate.py: {stale}"


def _ga_heads(path: Path) -> list[dict]:
    cfg = yaml.safe_load(path.read_text())
    det = cfg["model"]["init_args"]["detector"] if "model" in cfg else cfg
    head = det["init_args"]["rpn_head"]
    return [head] if head["class_path"].endswith("GARPN") else []


def test_every_ga_training_config_trains_with_the_papers_location_targets():
    heads = {p: _ga_heads(ROOT / p) for p in CLI_CONFIGS}
    ga = {p: h[0] for p, h in heads.items() if h}
    assert ga, "no training config uses GA-RPN"
    inverted = [p for p, h in ga.items() if h["init_args"].get("invert_loc_targets", False)]
    assert inverted == []


def test_parity_ga_configs_reproduce_mmdets_inverted_location_targets():
    paths = sorted((ROOT / "configs" / "parity").glob("*ga*.yaml"))
    assert paths, "no GA parity config"
    for path in paths:
        assert _ga_heads(path)[0]["init_args"]["invert_loc_targets"] is True, path
