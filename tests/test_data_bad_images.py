"""Bad data on real COCO photographs: the bad_images policy, the set-up check, and the annotation-file errors
that used to pass silently (duplicate ids, non-finite coordinates, boxes outside the image, no annotations)."""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from htc_lightning.data.coco import CocoDetection
from htc_lightning.data.datamodule import CocoDataModule
from htc_lightning.data.images import BadImageError
from htc_lightning.data.transforms import DetectionTransform
from htc_lightning.evaluation.coco import CocoEvaluator
from htc_lightning.structures import Detections
from htc_lightning.tools import check_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "bad_images"
LANDSCAPE = ["000000425989.jpg", "000000139270.jpg", "000000483330.jpg"]  # by image id; 196619 is portrait


@pytest.fixture
def root(tmp_path):
    """COCO layout with the four photos in train and val (the same json for both)."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        shutil.copytree(FIXTURE / "images", root / split)
        shutil.copy(FIXTURE / "instances.json", root / "annotations" / f"instances_{split}.json")
    return root


def _ann(root, split="train2017"):
    return root / "annotations" / f"instances_{split}.json"


def _edit(root, fn, split="train2017"):
    data = json.loads(_ann(root, split).read_text())
    fn(data)
    _ann(root, split).write_text(json.dumps(data))


def _truncate(root, name, split="train2017"):
    path = root / split / name
    path.write_bytes(path.read_bytes()[:3000])
    return path


def _dataset(root, **kwargs):
    kwargs.setdefault("transform", DetectionTransform([(160, 120)]))
    return CocoDetection(_ann(root), root / "train2017", train=True, **kwargs)


def _index(ds, file_name):
    return [info["file_name"] for info, _ in ds.records].index(file_name)


# -- the policy --------------------------------------------------------------------------------------------


def test_a_bad_image_is_an_error_naming_the_file_and_the_fix(root):
    path = _truncate(root, "000000139270.jpg")
    ds = _dataset(root)
    with pytest.raises(BadImageError) as info:
        ds[_index(ds, path.name)]
    assert str(path) in str(info.value)
    assert "--data.init_args.bad_images skip" in str(info.value) and "check_dataset" in str(info.value)


def test_a_size_that_disagrees_with_the_json_is_a_bad_image(root):
    Image.open(root / "train2017" / "000000139270.jpg").resize((300, 200)).save(root / "train2017" / "000000139270.jpg")
    ds = _dataset(root)
    with pytest.raises(BadImageError, match="it is 300x200 but the annotation file says 448x336"):
        ds[_index(ds, "000000139270.jpg")]


def test_skip_replaces_a_bad_sample_by_the_next_of_the_same_orientation(root):
    (root / "train2017" / "000000139270.jpg").write_bytes(b"")
    ds = _dataset(root, bad_images="skip")
    bad = _index(ds, "000000139270.jpg")
    image, target = ds[(bad, 7)]
    replacement = target["meta"]["file_name"]
    assert replacement in LANDSCAPE and replacement != "000000139270.jpg"
    assert target["meta"]["skipped"] == [(str(root / "train2017" / "000000139270.jpg"),
                                          "cannot decode it (cannot identify image file "
                                          f"'{root / 'train2017' / '000000139270.jpg'}')")]
    # the replacement is exactly that sample with the bad sample's seed: a resumed run sees the same batch
    same_image, same_target = ds[(_index(ds, replacement), 7)]
    assert torch.equal(image, same_image) and torch.equal(target["masks"], same_target["masks"])
    assert same_target["meta"]["skipped"] == []


def test_skip_follows_a_run_of_bad_images_and_lists_each(root):
    for name in ("000000425989.jpg", "000000483330.jpg"):  # the last two landscape images by id
        _truncate(root, name)
    ds = _dataset(root, bad_images="skip")
    _, target = ds[_index(ds, "000000425989.jpg")]
    assert [Path(p).name for p, _ in target["meta"]["skipped"]] == ["000000425989.jpg", "000000483330.jpg"]
    assert target["meta"]["file_name"] == "000000139270.jpg"  # wrapping around to the first landscape image


def test_skip_takes_another_orientation_when_its_own_has_no_good_image(root):
    for name in LANDSCAPE:
        (root / "train2017" / name).write_bytes(b"")
    ds = _dataset(root, bad_images="skip")
    _, target = ds[_index(ds, "000000139270.jpg")]
    assert target["meta"]["file_name"] == "000000196619.jpg" and len(target["meta"]["skipped"]) == 3


def test_skip_gives_up_with_an_error_when_the_data_is_broken_at_large(root):
    for name in (*LANDSCAPE, "000000196619.jpg"):
        (root / "train2017" / name).write_bytes(b"")
    ds = _dataset(root, bad_images="skip")
    with pytest.raises(BadImageError, match="bad image\\(s\\) in a row"):
        ds[0]


def test_an_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="bad_images must be 'error' or 'skip'"):
        CocoDetection(FIXTURE / "instances.json", FIXTURE / "images", bad_images="ignore")


# -- the set-up check --------------------------------------------------------------------------------------


def _three_bad_files(root):
    _truncate(root, "000000425989.jpg")
    (root / "train2017" / "000000139270.jpg").write_bytes(b"")
    Image.open(root / "train2017" / "000000483330.jpg").resize((200, 151)).save(root / "train2017" / "000000483330.jpg")


def test_check_images_lists_every_bad_file_in_one_error_before_training(root):
    _three_bad_files(root)
    dm = CocoDataModule(str(root), check_images=True, num_workers=0)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith("3 bad image(s) among the 4 listed in")
    for name, reason in (("000000425989.jpg", "cannot decode it"), ("000000139270.jpg", "the file is empty"),
                         ("000000483330.jpg", "it is 200x151 but the annotation file says 400x302")):
        assert f"{root / 'train2017' / name}: {reason}" in message
    assert "--data.init_args.bad_images skip" in message


def test_check_images_with_skip_warns_once_and_never_reads_the_bad_files(root, monkeypatch):
    _three_bad_files(root)
    dm = CocoDataModule(str(root), check_images=True, bad_images="skip", num_workers=0, train_scales=[(160, 120)])
    with pytest.warns(UserWarning, match="3 bad image\\(s\\) among the 4") as record:
        dm.setup("fit")
    assert len([w for w in record if "bad image(s) among" in str(w.message)]) == 1  # train only; val is clean
    ds = dm.train_dataset
    assert {ds.records[i][0]["file_name"] for i in ds.bad_indices} == {"000000425989.jpg", "000000139270.jpg",
                                                                       "000000483330.jpg"}
    for i in range(len(ds)):
        _, target = ds[i]
        assert target["meta"]["file_name"] not in {ds.records[j][0]["file_name"] for j in ds.bad_indices}


def test_check_dataset_command_prints_one_report_and_fails(root, capsys):
    _three_bad_files(root)
    assert check_dataset.main(["--data_root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "instances_train2017.json" in out and "instances_val2017.json" in out
    assert out.count("bad image(s) among the 4 listed") == 1  # val2017 is untouched
    for name in ("000000425989.jpg", "000000139270.jpg", "000000483330.jpg"):
        assert str(root / "train2017" / name) in out


def test_check_dataset_command_passes_a_clean_dataset(root, capsys):
    assert check_dataset.main(["--ann", str(_ann(root)), "--images", str(root / "train2017"), "--decode"]) == 0
    assert "4 images checked" in capsys.readouterr().out


# -- annotation files --------------------------------------------------------------------------------------


def test_duplicate_image_ids_are_an_error(root):
    _edit(root, lambda d: d["images"].append({**d["images"][0], "file_name": "000000483330.jpg"}))
    with pytest.raises(ValueError, match=r"1 image id\(s\) are used more than once: 425989 \(2 times\)"):
        _dataset(root)


def test_duplicate_annotation_ids_are_an_error(root):
    def repeat(d):
        d["annotations"][3]["id"] = d["annotations"][0]["id"]
    _edit(root, repeat)
    with pytest.raises(ValueError, match="annotation id\\(s\\) are used more than once"):
        _dataset(root)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_box_is_an_error_naming_the_annotation(root, value):
    data = json.loads(_ann(root).read_text())
    ann = data["annotations"][2]
    ann["bbox"][1] = value
    _ann(root).write_text(json.dumps(data))  # json.dumps writes NaN / Infinity
    with pytest.raises(ValueError, match=f"annotation {ann['id']} \\(image {ann['image_id']}\\).*must be finite"):
        _dataset(root)


def test_a_non_finite_polygon_coordinate_is_an_error_naming_the_annotation(root):
    data = json.loads(_ann(root).read_text())
    ann = next(a for a in data["annotations"] if isinstance(a["segmentation"], list))
    ann["segmentation"][0][3] = float("nan")
    _ann(root).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"annotation {ann['id']} .*non-finite coordinate"):
        _dataset(root)


def test_boxes_partly_outside_the_image_are_clipped_after_resizing(root):
    def overhang(d):
        ann = next(a for a in d["annotations"] if a["image_id"] == 483330 and not a["iscrowd"])
        ann["bbox"] = [-20.0, 250.0, 100.0, 100.0]  # the image is 400x302
        ann["id"] = 999
    _edit(root, overhang)
    ds = _dataset(root, transform=DetectionTransform([(800, 604)]))  # exactly 2x
    _, target = ds[_index(ds, "000000483330.jpg")]
    raw = CocoDetection(_ann(root), root / "train2017", train=True).load(_index(ds, "000000483330.jpg"))[1]
    k = [round(v) for v in raw["boxes"][:, 0].tolist()].index(-20)
    assert target["boxes"][k].tolist() == [0.0, 500.0, 160.0, 604.0]
    assert (target["boxes"][:, 0::2] <= 800).all() and (target["boxes"][:, 1::2] <= 604).all()


def test_a_validation_json_without_annotations_is_an_error_at_setup(root):
    _edit(root, lambda d: d.pop("annotations"), split="val2017")
    with pytest.raises(ValueError, match="has no annotations, so validation would score every metric -1"):
        CocoDataModule(str(root), num_workers=0).setup("fit")


def test_evaluating_without_annotations_is_an_error_or_format_only_when_writing(root, tmp_path):
    _edit(root, lambda d: d.update(annotations=[]), split="val2017")
    det = Detections(torch.tensor([[10.0, 10, 50, 50]]), torch.tensor([0.9]), torch.tensor([0]),
                     torch.ones(1, 302, 400, dtype=torch.bool))
    meta = {"image_id": 483330, "orig_size": (302, 400)}
    evaluator = CocoEvaluator(str(_ann(root, "val2017")), cat_ids=[1, 15, 17])
    evaluator.update([det], [meta])
    with pytest.raises(ValueError, match="has no annotations .* every COCO metric would be -1"):
        evaluator.compute()
    writer = CocoEvaluator(str(_ann(root, "val2017")), cat_ids=[1, 15, 17], outfile_prefix=str(tmp_path / "res"))
    writer.update([det], [meta])
    with pytest.warns(UserWarning, match="format-only"):
        assert writer.compute() == {}
    assert json.loads((tmp_path / "res.bbox.json").read_text())[0]["image_id"] == 483330


def test_the_evaluator_refuses_repeated_image_ids(root):
    _edit(root, lambda d: d["images"].append(dict(d["images"][0])), split="val2017")
    evaluator = CocoEvaluator(str(_ann(root, "val2017")))
    evaluator.update([Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                                 torch.zeros(0, 140, 213, dtype=torch.bool))], [{"image_id": 425989}])
    with pytest.raises(ValueError, match="image id\\(s\\) \\[425989\\] are used more than once"):
        evaluator.compute()


# -- the data module during training -----------------------------------------------------------------------


def test_skipped_files_are_reported_once_per_rank_and_counted_in_the_logs(root, tmp_path):
    import pytorch_lightning as pl
    from conftest import make_detector

    from htc_lightning.module import DetectionModule

    _truncate(root, "000000139270.jpg")
    dm = CocoDataModule(str(root), bad_images="skip", num_workers=1, batch_size=2, train_scales=[(160, 120)])
    module = DetectionModule(make_detector(num_classes=14), lr=0.01, warmup_iters=0, log_images=0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path / "run"), use_distributed_sampler=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, dm)
    reports = [str(w.message) for w in caught if "skipped bad image" in str(w.message)]
    assert len(reports) == 1 and reports[0].startswith(f"rank 0: skipped bad image {root / 'train2017'}/000000139270")
    assert float(trainer.callback_metrics["train/skipped_images"]) == 1.0  # once per epoch: its sample was drawn


def test_a_bad_image_stops_training_with_its_name_through_a_worker(root, tmp_path):
    import pytorch_lightning as pl
    from conftest import make_detector

    from htc_lightning.module import DetectionModule

    path = _truncate(root, "000000139270.jpg")
    dm = CocoDataModule(str(root), num_workers=1, batch_size=2, train_scales=[(160, 120)])
    module = DetectionModule(make_detector(num_classes=14), lr=0.01, warmup_iters=0, log_images=0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path / "run"), use_distributed_sampler=False)
    with pytest.raises(BadImageError, match=f"bad image {path}: cannot decode it.*bad_images skip"):
        trainer.fit(module, dm)


def test_masks_of_a_real_photo_are_those_of_the_dense_path_at_every_scale(root):
    dense = CocoDetection(_ann(root), root / "train2017", train=True)
    for scale in [(1333, 800), (160, 120), (97, 41), (400, 302)]:
        transform = DetectionTransform([scale], flip_prob=1.0)
        ours = CocoDetection(_ann(root), root / "train2017", transform, train=True)
        for i in range(len(ours)):
            _, target = ours[(i, 3)]
            image, raw = dense.load(i)
            _, expected = transform(image, raw, generator=torch.Generator().manual_seed(3))
            assert target["masks"].dtype == torch.uint8 and torch.equal(target["masks"], expected["masks"]), scale
            assert np.array_equal(target["boxes"].numpy(), expected["boxes"].numpy())


# -- phone photos and 16-bit files in a dataset ------------------------------------------------------------


def test_an_exif_rotated_phone_photo_trains_upright_with_its_annotations(root):
    path = root / "train2017" / "000000483330.jpg"
    upright = Image.open(path)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side, tagged "turn 90 degrees clockwise"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes(), quality=95)
    ds = CocoDetection(_ann(root), root / "train2017", train=True)  # the json keeps the upright 400x302
    image, target = ds.load(_index(ds, path.name))
    assert image.shape == (3, 302, 400) and target["masks"].shape[1:] == (302, 400)
    assert (image.float() - torch.from_numpy(np.array(upright)).permute(2, 0, 1).float()).abs().mean() < 3


def test_an_exif_rotated_photo_whose_json_gives_the_stored_size_is_a_bad_image(root):
    path = root / "train2017" / "000000483330.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.open(path).save(path, exif=exif.tobytes(), quality=95)  # pixels unchanged, tag says turn them
    ds = _dataset(root)
    with pytest.raises(BadImageError, match="EXIF orientation 8 turns it upright to 302x400"):
        ds[_index(ds, path.name)]
    assert "EXIF orientation 8" in _check_error(root)


def _check_error(root) -> str:
    """The error of a data module with check_images=True at set-up."""
    with pytest.raises(ValueError) as info:
        CocoDataModule(str(root), check_images=True, num_workers=0).setup("fit")
    return str(info.value)


def test_a_sixteen_bit_png_in_the_dataset_trains_as_its_picture_not_white(root):
    gray = np.array(Image.open(root / "train2017" / "000000139270.jpg").convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "train2017" / "000000139270.png")
    _edit(root, lambda d: [i.update(file_name="000000139270.png") for i in d["images"] if i["id"] == 139270])
    ds = CocoDetection(_ann(root), root / "train2017", train=True)
    image, _ = ds.load(_index(ds, "000000139270.png"))
    assert torch.equal(image[0], torch.from_numpy(gray)) and image.float().mean() < 200
