"""CocoDataModule: properties, the batch format of htc_lightning.structures, splits and rank sharding."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from htc_lightning.data.datamodule import CocoDataModule
from htc_lightning.data.synthetic import THING_CLASSES, make_synthetic_coco


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("dm"), num_train=6, num_val=3, seed=2, image_size=(64, 80))


def _dm(root, **kwargs):
    defaults = dict(train_scales=[(120, 96)], test_scale=(100, 80), num_workers=0, batch_size=2)
    return CocoDataModule(str(root), **{**defaults, **kwargs})


def _fake_trainer(world, rank, use_distributed_sampler=False):
    return SimpleNamespace(world_size=world, global_rank=rank,
                           _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler))


def test_properties_come_from_the_annotations(root):
    dm = _dm(root, stuff_maps="stuffthingmaps")
    assert dm.cat_ids == sorted(c for c, *_ in THING_CLASSES)
    assert dm.num_classes == len(THING_CLASSES)
    assert dm.class_names == [n for _, n, *_ in sorted(THING_CLASSES)]
    assert dm.val_ann_file == str((root / "annotations/instances_val2017.json").resolve())
    assert dm.test_ann_file == dm.val_ann_file
    assert dm.has_semantic and not _dm(root).has_semantic


def test_train_batches_follow_the_structures_format(root):
    dm = _dm(root, stuff_maps="stuffthingmaps")
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.float32 and images.shape[:2] == (2, 3)
    assert images.shape[-2] % 32 == 0 and images.shape[-1] % 32 == 0
    for t in targets:
        n = len(t["labels"])
        assert t["boxes"].shape == (n, 4) and t["boxes"].dtype == torch.float32
        assert t["labels"].dtype == torch.int64 and int(t["labels"].max()) < dm.num_classes
        assert t["masks"].shape == (n, *images.shape[-2:]) and t["masks"].dtype == torch.uint8
        assert t["semantic"].shape == images.shape[-2:] and t["semantic"].dtype == torch.int64
        assert t["crowd_boxes"].shape[1] == 4
        meta = t["meta"]
        assert set(meta) == {"image_id", "file_name", "orig_size", "img_size", "pad_size", "scale_factor", "flip"}
        assert meta["orig_size"] == (64, 80) and meta["img_size"] == (96, 120)
        assert meta["pad_size"] == tuple(images.shape[-2:])


def test_validation_uses_one_scale_without_flip_and_keeps_every_image(root):
    dm = _dm(root, val_batch_size=2)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    metas = [t["meta"] for _, targets in batches for t in targets]
    assert len(metas) == 3
    assert all(m["flip"] is False and m["img_size"] == (80, 100) for m in metas)


def test_test_split_defaults_to_val(root):
    dm = _dm(root)
    dm.setup("test")
    assert dm.test_dataset.ann_file == (root / "annotations/instances_val2017.json").resolve()
    assert dm.test_dataset.image_ids == [1000000, 1000001, 1000002]


def test_predict_reads_a_folder_and_targets_carry_only_meta(root, tmp_path):
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 30 * i, np.uint8)).save(tmp_path / f"img{i}.jpg")
    dm = _dm(root, predict_images=str(tmp_path), val_batch_size=2)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    targets = [t for _, ts in batches for t in ts]
    assert [t["meta"]["image_id"] for t in targets] == [0, 1, 2]
    assert all(set(t) == {"meta"} for t in targets)


def test_predict_without_a_folder_is_an_error(root):
    with pytest.raises(ValueError, match="predict_images"):
        _dm(root).setup("predict")


def test_ranks_from_the_trainer_get_disjoint_training_batches(root):
    seen = []
    for rank in range(2):
        dm = _dm(root, batch_size=1, group_by_aspect_ratio=False)
        dm.trainer = _fake_trainer(2, rank)
        loader = dm.train_dataloader()
        assert (dm.train_sampler.num_replicas, dm.train_sampler.rank) == (2, rank)
        seen.append({t["meta"]["image_id"] for _, targets in loader for t in targets})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 6


def test_validation_is_sharded_across_ranks(root):
    ids = []
    for rank in range(2):
        dm = _dm(root)
        dm.trainer = _fake_trainer(2, rank)
        ids.append([t["meta"]["image_id"] for _, targets in dm.val_dataloader() for t in targets])
    assert len(ids[0]) == len(ids[1]) == 2 and set(ids[0]) | set(ids[1]) == {1000000, 1000001, 1000002}


def test_distributed_trainer_must_not_inject_its_sampler(root):
    dm = _dm(root)
    dm.trainer = _fake_trainer(2, 0, use_distributed_sampler=True)
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()


def test_multiscale_training_respects_the_range(root):
    dm = _dm(root, train_short_range=(40, 90), train_max_long=110, flip_prob=1.0)
    dm.setup("fit")
    for _, targets in dm.train_dataloader():
        for t in targets:
            h, w = t["meta"]["img_size"]
            assert 40 <= min(h, w) <= 90 and max(h, w) <= 110 and t["meta"]["flip"] is True


def test_augmentation_does_not_depend_on_workers_or_global_rng(root):
    def run(num_workers, global_seed):
        torch.manual_seed(global_seed)
        dm = _dm(root, num_workers=num_workers, train_short_range=(50, 100), train_max_long=130)
        return [(t["meta"]["image_id"], t["meta"]["img_size"], t["meta"]["flip"], images[i].sum().item())
                for images, ts in dm.train_dataloader() for i, t in enumerate(ts)]
    main = run(0, 0)
    assert main == run(1, 123)
    assert len({m[1] for m in main}) > 1 and {m[2] for m in main} == {True, False}


def test_lightning_fit_drives_the_sampler_epochs(root):
    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            images, targets = batch
            self.seen.append((self.current_epoch, [t["meta"]["image_id"] for t in targets]))
            return (self.w - images.mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(root, batch_size=2)
    model = Model()
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    # two batches per epoch and, although no epoch ran to the end, epoch 1 used epoch 1's order
    expected = []
    for epoch in range(2):
        sampler = _dm(root).train_dataloader().batch_sampler
        sampler.set_epoch(epoch)
        expected += [(epoch, [dm.train_dataset.image_ids[i] for i in b]) for b in sampler.batches()[:2]]
    assert model.seen == expected


def test_a_training_split_without_usable_images_is_an_error(tmp_path):
    root = make_synthetic_coco(tmp_path, num_train=2, num_val=1, seed=0, image_size=(48, 48))
    ann = root / "annotations/instances_train2017.json"
    data = json.loads(ann.read_text())
    data["annotations"] = []
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="instances_train2017.json"):
        _dm(root).setup("fit")
