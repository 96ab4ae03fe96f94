"""The demo's summary picture: loss curve, AP per evaluation and predicted masks, from a tiny real run."""
from PIL import Image
from test_cli_real_htc import tiny_htc_config

from htc_lightning.cli import HTCLightningCLI
from htc_lightning.tools.demo_summary import main, read_history


def test_summary_picture_of_a_tiny_run(tmp_path, coco_root, capsys):
    config = tiny_htc_config(tmp_path, coco_root, max_steps=4, log_every_n_steps=1)
    HTCLightningCLI(args=["fit", "--config", config, "--trainer.logger", "true"])
    run = tmp_path / "run"
    history = read_history(run)
    assert len(history["train/loss"]) == 4
    assert len(history["val/segm_mAP"]) == 2  # one point per evaluation (every 2 steps)
    out = tmp_path / "summary.png"
    assert main(["--config", config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(out),
                 "--num-images", "2"]) == 0
    assert f"summary picture: {out}" in capsys.readouterr().out
    picture = Image.open(out)
    assert picture.width >= 800 and picture.height >= 264 + 256  # the curves, then a row of images
