"""``filter_empty_gt`` and repeat-factor sampling (LVIS's rule): which images train, how often, the same list on
every rank, and a resumed epoch replaying it; on synthetic lists and on the real photographs of coco_tiny_28."""
from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest
import torch
import yaml
from _real28 import COCO_TINY_28, real_htc_config

from htc_lightning.cli import HTCLightningCLI
from htc_lightning.data.coco import CocoDetection
from htc_lightning.data.datamodule import CocoDataModule
from htc_lightning.data.samplers import GroupedBatchSampler, repeat_factors


def test_repeat_factor_is_lvis_sqrt_of_threshold_over_image_frequency():
    labels = [{0}] * 99 + [{0, 1}] + [set()]  # category 1 in 1 of 101 images, one image without objects
    factors = repeat_factors(labels, threshold=0.1)
    assert factors[0] == 1.0  # category 0 is in almost every image: max(1, sqrt(0.1 / 0.99)) = 1
    assert factors[99] == pytest.approx(math.sqrt(0.1 / (1 / 101)))  # the image's rarest category decides
    assert factors[100] == 1.0


def test_each_index_appears_its_repeat_factor_times_per_epoch_on_average():
    factors = [1.0, 2.5, 1.2, 1.0, 3.3]
    sampler = GroupedBatchSampler([0] * 5, batch_size=2, repeat_factors=factors, seed=3)
    counts = Counter()
    epochs = 3000
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts.update(i for batch in sampler for i in batch)
    assert len(sampler) == math.ceil(round(sum(factors)) / 2)
    for i, r in enumerate(factors):
        assert counts[i] / epochs == pytest.approx(r * round(sum(factors)) / sum(factors), abs=0.08)


def test_ranks_split_one_shared_epoch_list():
    factors = [1.0, 2.7, 1.0, 1.6, 4.2, 1.0, 1.0]
    one = GroupedBatchSampler([0, 1, 0, 1, 0, 1, 0], 2, repeat_factors=factors, seed=5, num_replicas=1, rank=0)
    ranks = [GroupedBatchSampler([0, 1, 0, 1, 0, 1, 0], 2, repeat_factors=factors, seed=5, num_replicas=2, rank=r)
             for r in (0, 1)]
    for s in [one, *ranks]:
        s.set_epoch(4)
    shared = Counter(one.rank_indices())
    split = Counter(ranks[0].rank_indices()) + Counter(ranks[1].rank_indices())
    assert split - shared == Counter() or sum((split - shared).values()) <= 1  # at most one padding repeat
    assert len(ranks[0]) == len(ranks[1])


def test_a_resumed_epoch_yields_the_remaining_batches_with_the_same_augmentation_seeds():
    factors = [1.0, 2.5, 1.2, 3.0, 1.0, 1.4]
    kwargs = {"batch_size": 2, "repeat_factors": factors, "seed": 1, "with_seeds": True}
    first = GroupedBatchSampler([0, 0, 1, 1, 0, 1], **kwargs)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it), next(it)]
    state = first.state_dict()
    rest = list(it)
    resumed = GroupedBatchSampler([0, 0, 1, 1, 0, 1], **kwargs)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and len(head) + len(rest) == len(first)


def test_copies_of_an_image_draw_different_augmentations():
    sampler = GroupedBatchSampler([0, 0], batch_size=8, repeat_factors=[1.0, 4.0], with_seeds=True)
    (batch,) = list(sampler)
    seeds = [seed for index, seed in batch if index == 1]
    assert len(seeds) == 4 and len(set(seeds)) == 4


def test_repeat_factors_below_one_are_refused():
    with pytest.raises(ValueError, match="values >= 1"):
        GroupedBatchSampler([0, 0], 1, repeat_factors=[1.0, 0.5])


def _real_with_an_empty_image(tmp_path):
    """coco_tiny_28 copied, with every annotation of its first image removed (a real photograph without objects)."""
    root = tmp_path / "coco"
    shutil.copytree(COCO_TINY_28, root)
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    empty = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != empty]
    ann.write_text(json.dumps(data))
    return root, ann, empty


def test_filter_empty_gt_drops_or_keeps_images_without_objects(tmp_path):
    root, ann, empty = _real_with_an_empty_image(tmp_path)
    dropped = CocoDetection(ann, root / "val2017", train=True)
    kept = CocoDetection(ann, root / "val2017", train=True, filter_empty_gt=False)
    assert empty not in dropped.image_ids and len(dropped) == 3
    assert empty in kept.image_ids and len(kept) == 4
    _, target = kept.load(kept.image_ids.index(empty))
    assert target["boxes"].shape == (0, 4) and target["masks"].shape[0] == 0
    dm = CocoDataModule(str(root), train_ann="annotations/instances_val2017.json", train_images="val2017",
                        filter_empty_gt=False, num_workers=0)
    dm.setup("fit")
    assert empty in dm.train_dataset.image_ids


def test_repeat_factors_of_the_real_photographs_follow_their_categories():
    data = json.loads((COCO_TINY_28 / "annotations" / "instances_val2017.json").read_text())
    dm = CocoDataModule(str(COCO_TINY_28), train_ann="annotations/instances_val2017.json", train_images="val2017",
                        repeat_factor_threshold=0.5, num_workers=0, batch_size=1)
    dm.setup("fit")
    sampler = dm.train_dataloader().batch_sampler
    images_with = Counter(c for im in data["images"] for c in
                          {a["category_id"] for a in data["annotations"] if a["image_id"] == im["id"]})
    n = len(data["images"])
    for image_id, factor in zip(dm.train_dataset.image_ids, sampler.repeat_factors.tolist()):
        cats = {a["category_id"] for a in data["annotations"] if a["image_id"] == image_id}
        assert factor == pytest.approx(max(max(1.0, math.sqrt(0.5 / (images_with[c] / n))) for c in cats))
    assert len(sampler) == round(float(sampler.repeat_factors.sum()))


def test_htc_trains_on_real_photographs_with_an_empty_image_and_repeat_factors(tmp_path):
    root, _, _ = _real_with_an_empty_image(tmp_path)
    path = real_htc_config(tmp_path, max_steps=3, limit_val_batches=0)
    config = yaml.safe_load(open(path))
    config["data"]["init_args"].update(data_root=str(root), filter_empty_gt=False, repeat_factor_threshold=0.5)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    cli = HTCLightningCLI(args=["fit", "--config", path])
    assert cli.trainer.global_step == 3
    assert len(cli.datamodule.train_dataset) == 4  # the photograph without objects trains too
    loss = cli.trainer.logged_metrics["train/loss"]
    assert torch.isfinite(loss)
