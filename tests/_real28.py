"""A tiny HTC without the semantic branch on the four real photographs of tests/fixtures/coco_tiny_28."""
from __future__ import annotations

from pathlib import Path

import yaml
from test_cli_real_htc import tiny_htc_config

COCO_TINY_28 = (Path(__file__).parent / "fixtures" / "coco_tiny_28").resolve()


def real_htc_config(tmp_path: Path, scale: int = 128, **trainer) -> str:
    """The CLI config of tests/test_cli_real_htc.py, on the real photographs (train = val = the 4 images)."""
    path = Path(tiny_htc_config(tmp_path, COCO_TINY_28, **trainer))
    config = yaml.safe_load(path.read_text())
    del config["model"]["init_args"]["detector"]["init_args"]["roi_head"]["init_args"]["semantic_head"]
    data = config["data"]["init_args"]
    del data["stuff_maps"]
    data.update(train_ann="annotations/instances_val2017.json", train_images="val2017",
                train_scales=[[scale, scale]], test_scale=[scale, scale])
    path.write_text(yaml.safe_dump(config))
    return str(path)
