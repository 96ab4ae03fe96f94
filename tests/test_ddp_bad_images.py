"""bad_images="skip" under two gloo CPU processes: training goes on past bad files, each rank reports each file it
skipped once, and the logged count is the sum over ranks; with check_images the ranks share the header check
and replace the files it found without reading them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import make_detector

from htc_lightning.data.datamodule import CocoDataModule
from htc_lightning.data.samplers import GroupedBatchSampler
from htc_lightning.module import DetectionModule

FIXTURE = Path(__file__).parent / "fixtures" / "bad_images"


@pytest.mark.parametrize("check_images", [False, True])
def test_ddp_skips_bad_images_reports_them_once_per_rank_and_counts_them(tmp_path, capfd, check_images):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        shutil.copytree(FIXTURE / "images", root / split)
        shutil.copy(FIXTURE / "instances.json", root / "annotations" / f"instances_{split}.json")
    truncated = root / "train2017" / "000000139270.jpg"
    truncated.write_bytes(truncated.read_bytes()[:3000])
    (root / "train2017" / "000000483330.jpg").write_bytes(b"")

    def data(seed: int = 0, check: bool = False) -> CocoDataModule:
        return CocoDataModule(str(root), bad_images="skip", num_workers=1, batch_size=1, train_scales=[(160, 120)],
                              seed=seed, check_images=check)

    # what each rank will meet over the two epochs, from the dataset and the sampler themselves (the replacement
    # order is theirs), for the first shuffling seed that gives both ranks a bad file to report
    reference = data()
    reference.setup("fit")
    ds = reference.train_dataset

    def plan(seed: int) -> tuple[list[set[str]], int]:
        per_rank, last_epoch_total = [set(), set()], 0
        for epoch in (0, 1):
            for rank in (0, 1):
                sampler = GroupedBatchSampler(ds.aspect_groups, 1, seed=seed, num_replicas=2, rank=rank,
                                              with_seeds=True)
                sampler.set_epoch(epoch)
                files = [p for batch in sampler for key in batch for p, _ in ds[key][1]["meta"]["skipped"]]
                per_rank[rank] |= set(files)
                last_epoch_total += len(files) if epoch == 1 else 0
        return per_rank, last_epoch_total

    seed = next(s for s in range(50) if all(plan(s)[0]))
    skipped_per_rank, total = plan(seed)
    assert total == 3  # per epoch: 139270's sample skips itself, 483330's skips itself and then 139270

    pl.seed_everything(0, verbose=False)
    module = DetectionModule(make_detector(num_classes=reference.num_classes), lr=0.01, warmup_iters=0, log_images=0)
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_epochs=2, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path / "run"),
                         use_distributed_sampler=False)
    trainer.fit(module, data(seed, check_images))
    assert trainer.state.finished
    assert float(trainer.callback_metrics["train/skipped_images"]) == total  # the last epoch, both ranks

    err = capfd.readouterr().err
    if check_images:  # each rank read half of the headers and got the whole list
        assert err.count("2 bad image(s) among the 4 listed in") == 2 and "found by check_images" in err
    for rank, files in enumerate(skipped_per_rank):
        for path in files:  # reported by its rank, once over the two epochs
            assert err.count(f"rank {rank}: skipped bad image {path} ") == 1, (rank, path, err[-3000:])
