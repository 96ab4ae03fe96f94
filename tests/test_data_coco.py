"""CocoDetection on real files: what it returns and how each kind of bad input is reported."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from htc_lightning.data.coco import CocoDetection, ImageFolder
from htc_lightning.data.synthetic import make_synthetic_coco


@pytest.fixture
def root(tmp_path):
    return make_synthetic_coco(tmp_path / "coco", num_train=5, num_val=2, seed=11, image_size=(64, 72))


def _ann_path(root):
    return root / "annotations" / "instances_train2017.json"


def _edit(root, fn):
    data = json.loads(_ann_path(root).read_text())
    fn(data)
    _ann_path(root).write_text(json.dumps(data))
    return data


def _dataset(root, **kwargs):
    return CocoDetection(_ann_path(root), root / "train2017", **kwargs)


def test_loads_masks_boxes_labels_like_pycocotools(root):
    coco = COCO(str(_ann_path(root)))
    ds = _dataset(root, stuff_dir=root / "stuffthingmaps" / "train2017")
    cat_ids = sorted(coco.getCatIds())
    assert ds.cat_ids == cat_ids and len(ds) == 5
    for i in range(len(ds)):
        image, target = ds[i]
        anns = [a for a in coco.imgToAnns[target["meta"]["image_id"]] if not a["iscrowd"]]
        assert image.shape == (3, 64, 72) and image.dtype == torch.uint8
        assert target["masks"].shape == (len(anns), 64, 72)
        for k, ann in enumerate(anns):
            assert np.array_equal(target["masks"][k].numpy(), coco.annToMask(ann))
            x, y, w, h = ann["bbox"]
            assert target["boxes"][k].tolist() == [x, y, x + w, y + h]
            assert cat_ids[target["labels"][k]] == ann["category_id"]
        assert target["semantic"].shape == (64, 72)


def test_crowd_annotations_become_crowd_boxes(root):
    ds = _dataset(root)
    data = json.loads(_ann_path(root).read_text())
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowd
    index = ds.image_ids.index(crowd[0]["image_id"])
    _, target = ds[index]
    x, y, w, h = crowd[0]["bbox"]
    assert [x, y, x + w, y + h] in target["crowd_boxes"].tolist()
    assert len(target["labels"]) == len(target["boxes"]) == len(target["masks"])


def test_training_drops_images_without_usable_annotations_but_evaluation_keeps_them(root):
    def crowd_only_1_and_nothing_for_2(d):
        for a in d["annotations"]:
            if a["image_id"] == 1:
                a["iscrowd"] = 1
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 2]
    data = _edit(root, crowd_only_1_and_nothing_for_2)
    assert any(a["image_id"] == 1 for a in data["annotations"])
    assert 1 not in _dataset(root, train=True).image_ids and 2 not in _dataset(root, train=True).image_ids
    val = _dataset(root)
    assert {1, 2} <= set(val.image_ids)
    _, target = val[val.image_ids.index(2)]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 64, 72)


def test_missing_image_is_an_error_naming_the_file(root):
    (root / "train2017" / "000000000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000000000003.jpg"):
        _dataset(root)


def test_missing_image_can_be_skipped_with_a_warning(root):
    (root / "train2017" / "000000000003.jpg").unlink()
    with pytest.warns(UserWarning, match="000000000003.jpg"):
        ds = _dataset(root, missing_images="skip")
    assert 3 not in ds.image_ids and len(ds) == 4


def test_truncated_jpeg_is_an_error_naming_the_file(root):
    path = root / "train2017" / "000000000002.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    ds = _dataset(root)
    with pytest.raises(OSError, match="000000000002.jpg"):
        ds[ds.image_ids.index(2)]


def test_non_image_file_is_an_error_naming_the_file(root):
    (root / "train2017" / "000000000002.jpg").write_text("not an image")
    ds = _dataset(root)
    with pytest.raises(OSError, match="000000000002.jpg"):
        ds[ds.image_ids.index(2)]


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_other_colour_modes_are_converted_to_rgb(root, mode):
    path = root / "train2017" / "000000000001.jpg"
    rgb = Image.open(path).convert("RGB")
    if mode in ("RGBA", "P"):  # JPEG cannot hold these: store a PNG and point the annotation at it
        _edit(root, lambda d: [i.update(file_name="000000000001.png") for i in d["images"] if i["id"] == 1])
        path = path.with_suffix(".png")
    rgb.convert(mode).save(path)
    image, _ = _dataset(root)[0]
    assert image.shape == (3, 64, 72) and image.dtype == torch.uint8
    if mode == "L":
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_empty_boxes_are_dropped_in_one_warning_with_counts_and_ids(root):
    def corrupt(d):
        d["annotations"][0]["bbox"][2] = 0
        d["annotations"][1]["bbox"][3] = -4
        d["annotations"][2]["bbox"][2] = 0.5  # sub-pixel: mmdet skips w < 1 too
        d["annotations"][3]["bbox"][:2] = [500, 500]  # outside the image
    data = _edit(root, corrupt)
    ids = [a["id"] for a in data["annotations"][:4]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _dataset(root)
    messages = [str(w.message) for w in caught if "width/height" in str(w.message)]
    assert len(messages) == 1
    assert "4 annotation(s)" in messages[0] and all(str(i) in messages[0] for i in ids)
    kept = sum(len(anns) for _, anns in ds.records)
    assert kept == len(data["annotations"]) - 4


def test_bad_polygon_parts_are_dropped_and_counted(root):
    def corrupt(d):
        polys = [a for a in d["annotations"] if isinstance(a["segmentation"], list)]
        polys[0]["segmentation"] = [[1, 1, 5, 5]]                        # 2 points: object becomes ignored
        polys[1]["segmentation"] = polys[1]["segmentation"] + [[1, 2, 3]]  # odd part dropped, object kept
        d["bad"] = [polys[0]["id"], polys[1]["id"]]
    data = _edit(root, corrupt)
    with pytest.warns(UserWarning, match="polygon") as record:
        ds = _dataset(root)
    message = next(str(w.message) for w in record if "polygon" in str(w.message))
    assert "2 polygon part(s)" in message and "2 annotation(s)" in message
    assert str(data["bad"][0]) in message and str(data["bad"][1]) in message
    anns = {a["id"]: a for _, image_anns in ds.records for a in image_anns}
    assert anns[data["bad"][0]]["iscrowd"] == 1 and anns[data["bad"][1]]["iscrowd"] == 0
    ignored = next(a for a in data["annotations"] if a["id"] == data["bad"][0])
    index = ds.image_ids.index(ignored["image_id"])
    x, y, w, h = ignored["bbox"]
    assert [x, y, x + w, y + h] in ds[index][1]["crowd_boxes"].tolist()  # as mmdet: an ignored region
    for i in range(len(ds)):
        ds[i]  # the remaining polygon of the second annotation still decodes


def test_unknown_category_is_an_error_naming_the_annotation(root):
    data = _edit(root, lambda d: d["annotations"][2].update(category_id=999))
    with pytest.raises(ValueError, match=f"annotation {data['annotations'][2]['id']} .*category_id 999"):
        _dataset(root)


def test_stuff_map_of_another_size_is_an_error_naming_both_files(root):
    png = root / "stuffthingmaps" / "train2017" / "000000000001.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(png)
    ds = _dataset(root, stuff_dir=png.parent)
    with pytest.raises(ValueError, match=r"000000000001\.png.*000000000001\.jpg"):
        ds[ds.image_ids.index(1)]


def test_malformed_json_is_an_error_naming_file_line_and_column(root):
    _ann_path(root).write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(ValueError, match=r"instances_train2017\.json.*line 3, column 19"):
        _dataset(root)


def test_aspect_groups_follow_the_annotated_sizes(root):
    _edit(root, lambda d: d["images"][0].update(height=100))  # portrait on paper
    ds = _dataset(root)
    assert ds.aspect_groups == [1, 0, 0, 0, 0]


def test_image_folder_yields_meta_with_the_index_as_id(tmp_path):
    for name in ("b.png", "a.jpg"):
        Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("skip me")
    ds = ImageFolder(tmp_path)
    assert len(ds) == 2
    image, target = ds[1]
    assert image.shape == (3, 8, 6)
    assert target == {"meta": {"image_id": 1, "file_name": "b.png", "path": str((tmp_path / "b.png").resolve()),
                               "orig_size": (8, 6)}}
