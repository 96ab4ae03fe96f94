"""Packed annotations: the dataset yields exactly the samples of the unpacked records, on synthetic and real
COCO data, from memory and from the node's cache file; a cache hit repeats the parse's warnings."""
import copy
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from htc_lightning.data import packed
from htc_lightning.data.coco import CocoDetection
from htc_lightning.data.packed import PackedRecords
from htc_lightning.data.synthetic import make_synthetic_coco
from htc_lightning.data.transforms import DetectionTransform

REAL = Path(__file__).parent / "fixtures" / "coco_real"


@pytest.fixture
def synthetic(tmp_path):
    root = make_synthetic_coco(tmp_path / "coco", num_train=6, num_val=2, seed=3, image_size=(64, 80))
    return root / "annotations" / "instances_train2017.json", root / "train2017"


@pytest.fixture(params=["synthetic", "real"])
def split(request, synthetic):
    return synthetic if request.param == "synthetic" else (REAL / "instances.json", REAL / "images")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HTC_LIGHTNING_ANN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packed, "CACHE_MIN_BYTES", 0)
    return tmp_path / "cache"


def _unpacked(ds: CocoDetection, **parse_args) -> CocoDetection:
    """The same dataset reading the parser's plain list of dicts, as before packing."""
    ref = copy.copy(ds)
    ref.records = CocoDetection._parse(copy.copy(ds), parse_args.get("train", False), "error", None, None)
    return ref


def _assert_same_sample(a, b):
    (image_a, target_a), (image_b, target_b) = a, b
    assert torch.equal(image_a, image_b)
    assert target_a.keys() == target_b.keys()
    for key in target_a:
        if isinstance(target_a[key], torch.Tensor):
            assert target_a[key].dtype == target_b[key].dtype and torch.equal(target_a[key], target_b[key]), key
        else:
            assert target_a[key] == target_b[key], key


@pytest.mark.parametrize("train", [False, True])
def test_packed_dataset_yields_exactly_the_unpacked_samples(split, train):
    ds = CocoDetection(*split, train=train)
    ref = _unpacked(ds, train=train)
    assert isinstance(ds.records, PackedRecords) and len(ds) == len(ref.records) > 0
    assert [r for r in ds.records] == ref.records
    for i in range(len(ds)):
        _assert_same_sample(ds[i], ref[i])


def test_packed_dataset_yields_the_same_augmented_samples(split):
    ds = CocoDetection(*split, transform=DetectionTransform([(96, 64)], flip_prob=0.5), train=True)
    ref = _unpacked(ds, train=True)
    for i in range(len(ds)):
        _assert_same_sample(ds[(i, 100 + i)], ref[(i, 100 + i)])


def test_image_ids_and_aspect_groups_come_from_arrays_without_unpacking():
    ds = CocoDetection(REAL / "instances.json", REAL / "images")
    infos = [info for info, _ in _unpacked(ds).records]
    assert ds.image_ids == [info["id"] for info in infos]
    assert ds.aspect_groups == [int(info["width"] < info["height"]) for info in infos]
    assert 1 in ds.aspect_groups  # the fixture holds a portrait image


def test_aspect_groups_name_an_image_without_size(synthetic):
    ann_file, image_dir = synthetic
    data = json.loads(ann_file.read_text())
    del data["images"][0]["width"]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"image {data['images'][0]['id']} in .* has no 'width'/'height'"):
        _ = CocoDetection(ann_file, image_dir).aspect_groups


def test_records_round_trip_every_kind_of_segmentation():
    records = [
        ({"id": 1, "height": 10, "width": 12, "file_name": "a.jpg"},
         [{"id": 1, "segmentation": [[1, 2, 3.5, 4, 5, 6], [0.25, 1, 2, 3, 4, 5, 6, 7]], "bbox": [1, 2, 3, 4]},
          {"id": 2, "segmentation": {"counts": [3, 2, 115], "size": [10, 12]}, "iscrowd": 1},
          {"id": 3, "segmentation": {"counts": "52203", "size": [10, 12]}},
          {"id": 4, "segmentation": [["1", 2, 3, 4, 5, 6]]},  # not numbers: kept verbatim for the checks
          {"id": 5, "segmentation": []},
          {"id": 6}]),
        ({"id": 7, "file_name": "b.jpg"}, []),
        ({"id": 8, "height": 3, "width": 2, "file_name": "c.jpg"},
         [{"id": 9, "segmentation": [[float("nan"), 1e300, -0.0, 2, 3, 4]]}]),
    ]
    packed_records = PackedRecords(records)
    assert len(packed_records) == 3 and packed_records.image_ids.tolist() == [1, 7, 8]
    assert packed_records.sizes.tolist() == [[10, 12], [-1, -1], [3, 2]]
    assert packed_records[0] == records[0] and packed_records[1] == records[1] and packed_records[-3] == records[0]
    nan_part = packed_records[2][1][0]["segmentation"][0]
    assert np.isnan(nan_part[0]) and nan_part[1:] == [1e300, -0.0, 2, 3, 4]
    assert all(type(v) is float for v in packed_records[0][1][0]["segmentation"][0])
    assert packed_records[0:2] == records[0:2]
    with pytest.raises(IndexError, match="record 3 out of range for 3 records"):
        packed_records[3]
    assert pickle.loads(pickle.dumps(packed_records))[0] == records[0]


def test_second_dataset_maps_the_cache_file_the_first_wrote(split, cache):
    first = CocoDetection(*split, train=True)
    files = list(cache.glob("*.pack"))
    assert len(files) == 1
    second = CocoDetection(*split, train=True)
    assert second.records._path == files[0]
    assert second.records._arrays["coords"].base is not None  # a view of the mapping, not a copy
    assert second.cat_ids == first.cat_ids and second.class_names == first.class_names
    assert second.cat_to_label == first.cat_to_label
    ref = _unpacked(first, train=True)
    for i in range(len(second)):
        _assert_same_sample(second[i], ref[i])
    # a spawned DataLoader worker gets the path and maps the file itself
    clone = pickle.loads(pickle.dumps(second))
    assert clone.records._path == files[0] and clone.records[0] == second.records[0]


def test_cache_key_follows_the_json_content_and_the_arguments(synthetic, cache):
    ann_file, image_dir = synthetic
    CocoDetection(ann_file, image_dir)
    CocoDetection(ann_file, image_dir, train=True)
    assert len(list(cache.glob("*.pack"))) == 2
    data = json.loads(ann_file.read_text())
    data["annotations"] = data["annotations"][1:]
    ann_file.write_text(json.dumps(data))
    ds = CocoDetection(ann_file, image_dir)
    assert sum(len(anns) for _, anns in ds.records) == len(data["annotations"])
    # the new content's file replaced the old one of the same options; the train=True one stays
    assert len(list(cache.glob("*.pack"))) == 2
    assert len(CocoDetection(ann_file, image_dir, train=True)) == len(ds)
    assert len(list(cache.glob("*.pack"))) == 2


def test_a_cache_hit_repeats_the_warnings_of_the_parse(synthetic, cache):
    ann_file, image_dir = synthetic
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["bbox"][2] = 0
    ann_file.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="dropped 1 annotation") as parsed:
        CocoDetection(ann_file, image_dir)
    with pytest.warns(UserWarning, match="dropped 1 annotation") as mapped:
        CocoDetection(ann_file, image_dir)
    assert [str(w.message) for w in parsed] == [str(w.message) for w in mapped]
    assert all(w.filename == __file__ for w in mapped)  # pointing at the caller, as before


def test_errors_of_the_parse_are_raised_and_nothing_is_cached(synthetic, cache):
    ann_file, image_dir = synthetic
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["category_id"] = 999
    ann_file.write_text(json.dumps(data))
    for _ in range(2):
        with pytest.raises(ValueError, match="category_id 999 is not in 'categories'"):
            CocoDetection(ann_file, image_dir)
    assert not list(cache.glob("*.pack"))


def test_an_unwritable_cache_folder_falls_back_to_parsing_with_a_warning(synthetic, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("HTC_LIGHTNING_ANN_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(packed, "CACHE_MIN_BYTES", 0)
    with pytest.warns(UserWarning, match="cannot use the annotation cache folder"):
        ds = CocoDetection(*synthetic)
    assert isinstance(ds.records, PackedRecords) and len(ds) == 6


def test_small_files_and_off_skip_the_cache(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("HTC_LIGHTNING_ANN_CACHE", str(tmp_path / "cache"))
    CocoDetection(*synthetic)  # far below CACHE_MIN_BYTES
    monkeypatch.setattr(packed, "CACHE_MIN_BYTES", 0)
    monkeypatch.setenv("HTC_LIGHTNING_ANN_CACHE", "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(*synthetic)
    assert not (tmp_path / "cache").exists()


def test_a_failed_cache_write_parses_here_with_a_warning(synthetic, cache, monkeypatch):
    def full_disk(self, path, meta):
        raise OSError("No space left on device")
    monkeypatch.setattr(PackedRecords, "save", full_disk)  # the forked parser inherits it
    with pytest.warns(UserWarning, match="cannot write the annotation cache .*No space left on device"):
        ds = CocoDetection(*synthetic)
    assert len(ds) == 6 and ds.cat_ids and not list(cache.glob("*.pack"))


def test_an_empty_split_round_trips_through_the_cache_file(tmp_path):
    PackedRecords([]).save(tmp_path / "empty.pack", {"attributes": {}})
    records, meta = PackedRecords.load(tmp_path / "empty.pack")
    assert len(records) == 0 and records.image_ids.tolist() == [] and records.sizes.shape == (0, 2)
    assert meta == {"attributes": {}}
