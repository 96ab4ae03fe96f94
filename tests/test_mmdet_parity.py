"""Number-for-number parity with mmdetection 3.3.0 on the oracle's tiny dumps (tests/fixtures/oracle,
made by ../shared/oracle/dump_reference.py and dump_losses.py; see that folder's README)."""
import re
from pathlib import Path

import pytest

from htc_lightning.tools.mmdet_parity import FAMILY_CONFIG, family_of, main

pytestmark = pytest.mark.reference
ROOT = Path(__file__).resolve().parents[1]
DUMPS = ROOT / "tests" / "fixtures" / "oracle"
CONFIGS = ROOT / "configs" / "parity"

INFERENCE = sorted(p.stem for p in DUMPS.glob("tiny_*.pt"))
LOSSES = sorted(p.stem for p in DUMPS.glob("loss_*.pt"))


def test_every_family_has_inference_and_loss_dumps():
    assert {family_of(s) for s in INFERENCE} == set(FAMILY_CONFIG)
    assert {family_of(s) for s in LOSSES} == set(FAMILY_CONFIG)


@pytest.mark.parametrize("stem", INFERENCE)
def test_inference_matches_mmdet_stage_by_stage(stem, device, capsys):
    code = main(["--dump", str(DUMPS / f"{stem}.pt"), "--config", str(CONFIGS / FAMILY_CONFIG[family_of(stem)]),
                 "--device", device])
    out = capsys.readouterr().out
    assert code == 0 and out.rstrip().endswith("parity: PASS"), out
    assert "FAIL" not in out
    assert "summary: largest normalised difference" in out


@pytest.mark.parametrize("stem", LOSSES)
def test_training_losses_match_mmdet_term_by_term(stem, device, capsys):
    code = main(["--losses", "--dump", str(DUMPS / f"{stem}.pt"),
                 "--config", str(CONFIGS / FAMILY_CONFIG[family_of(stem)]), "--device", device])
    out = capsys.readouterr().out
    assert code == 0 and out.rstrip().endswith("parity: PASS"), out
    assert out.count("ok   loss ") >= 2
    # the RoI head took mmdet's own proposals, compared with ours on their own, tie-aware
    assert ("ok   training proposals image 0" in out) == (family_of(stem) != "ga_rpn"), out
    assert "near-ties accepted" in out


def test_a_wrong_weight_is_caught(tmp_path, capsys):
    import torch

    dump = torch.load(DUMPS / "tiny_htc_s0.pt", weights_only=False)
    dump["state_dict"]["roi_head.bbox_head.1.fc_cls.bias"] += 0.01
    path = tmp_path / "broken.pt"
    torch.save(dump, path)
    code = main(["--dump", str(path), "--config", str(CONFIGS / "htc_tiny.yaml")])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL stage 1 cls_score" in out and out.rstrip().endswith("parity: FAIL")


def test_a_shifted_location_filter_that_is_not_a_near_tie_is_caught(capsys):
    # 0.01 -> 0.02: every location whose reference sigmoid(loc) lies in [0.01, 0.02) flips, far (in logit
    # terms) from the reference's threshold, so the flips are not accepted as near-ties
    code = main(["--dump", str(DUMPS / "tiny_htc_ga_s0.pt"), "--config", str(CONFIGS / "htc_ga_rpn_tiny.yaml"),
                 "--set", "rpn_head.init_args.loc_filter_thr=0.02"])
    out = capsys.readouterr().out
    assert code == 1 and out.rstrip().endswith("parity: FAIL")
    flipped = re.finditer(r"FAIL loc filter level \d +(\d+) flipped \((\d+) near", out)
    flips = [tuple(map(int, m.groups())) for m in flipped]
    assert flips and all(near < count for count, near in flips), out


def test_a_shifted_score_threshold_is_caught(capsys):
    code = main(["--dump", str(DUMPS / "tiny_htc_s0.pt"), "--config", str(CONFIGS / "htc_tiny.yaml"),
                 "--set", "roi_head.init_args.score_thr=0.25"])  # about half the reference's scores are lower
    out = capsys.readouterr().out
    assert code == 1 and "FAIL detections" in out and out.rstrip().endswith("parity: FAIL")


def test_the_roi_head_losses_are_on_the_dumps_proposals(tmp_path, capsys):
    import torch

    dump = torch.load(DUMPS / "loss_htc_s1.pt", weights_only=False)
    dump["proposals"] = [p[1:] for p in dump["proposals"]]  # mmdet's best proposal gone: one sample fewer
    path = tmp_path / "one_proposal_fewer.pt"
    torch.save(dump, path)
    code = main(["--losses", "--dump", str(path), "--config", str(CONFIGS / "htc_tiny.yaml")])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL training proposals image 0" in out, out
    assert "FAIL loss s0.loss_bbox" in out and "ok   loss loss_rpn_cls" in out, out
