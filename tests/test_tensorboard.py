"""TensorBoard (the dev extra) is Lightning's default logger: a tiny fit writes the train/* scalars and the
validation images into an event file that tensorboard's own reader reads back."""
from conftest import fake_cli_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from htc_lightning.cli import HTCLightningCLI


def test_a_tiny_fit_writes_train_scalars_and_validation_images(tmp_path):
    config = fake_cli_config(tmp_path, max_steps=4, log_every_n_steps=1)
    cli = HTCLightningCLI(args=["fit", "--config", config, "--trainer.logger", "true",
                                "--model.init_args.log_images", "2"])
    events = list((tmp_path / "run" / "lightning_logs").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and type(cli.trainer.logger).__name__ == "TensorBoardLogger"
    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    scalars, images = set(accumulator.Tags()["scalars"]), set(accumulator.Tags()["images"])
    assert {"train/loss", "train/loss_bbox", "train/loss_cls", "val/bbox_mAP", "val/segm_mAP"} <= scalars
    assert len(accumulator.Scalars("train/loss")) == 4
    assert images == {"val/image_0", "val/image_1"}
    assert accumulator.Images("val/image_0")[0].width == 64
