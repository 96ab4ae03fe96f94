"""The synthetic COCO generator: layout, determinism, annotation kinds, stuff maps."""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from htc_lightning.data.synthetic import STUFF_CLASSES, THING_CLASSES, main, make_synthetic_coco


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("syn"), num_train=12, num_val=3, seed=7, image_size=(80, 96))


def _coco(root, split="train"):
    return COCO(str(root / "annotations" / f"instances_{split}2017.json"))


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", 3, 2, seed=3, image_size=(64, 64))
    b = make_synthetic_coco(tmp_path / "b", 3, 2, seed=3, image_size=(64, 64))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 2 * 5
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_different_seed_gives_different_annotations(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", 3, 1, seed=0, image_size=(64, 64))
    b = make_synthetic_coco(tmp_path / "b", 3, 1, seed=1, image_size=(64, 64))
    ann = "annotations/instances_train2017.json"
    assert (a / ann).read_bytes() != (b / ann).read_bytes()


def test_layout_is_coco_2017(root):
    for split in ("train2017", "val2017"):
        coco = _coco(root, split[:-4])
        for img in coco.dataset["images"]:
            assert (root / split / img["file_name"]).is_file()
            stem = img["file_name"].rsplit(".", 1)[0]
            assert (root / "stuffthingmaps" / split / f"{stem}.png").is_file()
            with Image.open(root / split / img["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"]) == (96, 80)


def test_masks_decode_to_their_area_and_box(root):
    coco = _coco(root)
    for ann in coco.dataset["annotations"]:
        mask = coco.annToMask(ann)
        assert mask.sum() == ann["area"] > 0
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_polygons_rle_and_crowd_are_all_present(root):
    kinds = {"polygon": 0, "uncompressed": 0, "compressed": 0, "crowd": 0}
    for ann in _coco(root).dataset["annotations"]:
        seg = ann["segmentation"]
        kind = "polygon" if isinstance(seg, list) else "uncompressed" if isinstance(seg["counts"], list) \
            else "compressed"
        kinds[kind] += 1
        kinds["crowd"] += ann["iscrowd"]
    assert all(v > 0 for v in kinds.values()), kinds
    assert kinds["polygon"] > max(kinds["uncompressed"], kinds["compressed"])


def test_objects_per_image_and_size(root):
    coco = _coco(root)
    for img_id in coco.getImgIds():
        things = [a for a in coco.imgToAnns[img_id] if not a["iscrowd"]]
        assert 1 <= len(things) <= 4
        for a in things:
            assert max(a["bbox"][2:]) >= 0.1 * 80


def test_category_ids_are_non_contiguous(root):
    ids = sorted(c["id"] for c in _coco(root).dataset["categories"])
    assert ids == sorted(c[0] for c in THING_CLASSES)
    assert ids != list(range(1, len(ids) + 1))


def test_stuff_maps_align_with_instances(root):
    coco = _coco(root)
    thing_values = {c - 1 for c, *_ in THING_CLASSES}
    seen = set()
    for img in coco.dataset["images"]:
        stuff = np.asarray(Image.open(root / "stuffthingmaps" / "train2017" / img["file_name"].replace(".jpg", ".png")))
        assert stuff.shape == (img["height"], img["width"]) and stuff.dtype == np.uint8
        seen |= set(np.unique(stuff).tolist())
        for ann in coco.imgToAnns[img["id"]]:
            assert (stuff[coco.annToMask(ann).astype(bool)] == ann["category_id"] - 1).all()
        covered = np.zeros(stuff.shape, bool)
        for ann in coco.imgToAnns[img["id"]]:
            covered |= coco.annToMask(ann).astype(bool)
        assert not np.isin(stuff[~covered], list(thing_values)).any()
    assert 255 in seen
    assert seen & {c - 1 for c, _ in STUFF_CLASSES}
    assert min(c for c, _ in STUFF_CLASSES) > max(c for c, *_ in THING_CLASSES)


def test_command_line_writes_the_dataset(tmp_path, capsys):
    main(["--out", str(tmp_path / "d"), "--num-train", "2", "--num-val", "1", "--seed", "0",
          "--image-size", "48", "64"])
    data = json.loads((tmp_path / "d" / "annotations" / "instances_val2017.json").read_text())
    assert len(data["images"]) == 1 and data["images"][0]["height"] == 48 and data["images"][0]["width"] == 64
    assert len(list((tmp_path / "d" / "train2017").glob("*.jpg"))) == 2
