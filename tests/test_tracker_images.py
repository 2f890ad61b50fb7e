"""Sample images with "prompt | reward" captions on the trackers (issue 19, as ddpo-pytorch logs
them): TensorBoard through accelerate's real tracker, read back from its event file; W&B (not
installed here) on the tracker call it receives."""

import io
import sys
import types

import numpy as np
import torch
from PIL import Image

from flowrl.report import image_grid, log_sample_images

PROMPTS = ["a cat", "a dog", "a red square"]
REWARDS = torch.tensor([0.5, -1.25, 2.0])
CAPTIONS = ["a cat | 0.5", "a dog | -1.25"]


def _images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(0))


def test_tensorboard_gets_a_captioned_grid_and_the_captions(tmp_path):
    from accelerate import PartialState
    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    PartialState()  # what accelerate's trackers check for the main process
    tracker = TensorBoardTracker("run", logging_dir=tmp_path)
    tracker.start()  # as Accelerator.init_trackers does
    images = _images()
    log_sample_images([tracker], images, PROMPTS, REWARDS, step=3, n=2)
    tracker.finish()

    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "tensors": 0}).Reload()
    (event,) = events.Images("samples")
    assert event.step == 3
    logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(logged, np.asarray(image_grid(images[:2], CAPTIONS, ncol=2)))
    (text,) = events.Tensors("samples_captions/text_summary")
    assert text.step == 3
    assert text.tensor_proto.string_val[0].decode() == "\n\n".join(CAPTIONS)


def test_wandb_gets_captioned_images(monkeypatch):
    class Image_:  # wandb.Image's signature: (data, caption=...)
        def __init__(self, data, caption=None):
            self.data, self.caption = data, caption

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=Image_))
    calls = []
    tracker = types.SimpleNamespace(name="wandb", log=lambda values, step: calls.append((values, step)))
    images = _images()
    log_sample_images([tracker], images, PROMPTS, REWARDS, step=7, n=2)
    ((values, step),) = calls
    assert step == 7 and list(values) == ["samples"]
    assert [im.caption for im in values["samples"]] == CAPTIONS
    expected = (images[:2] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for im, want in zip(values["samples"], expected):
        np.testing.assert_array_equal(im.data, want)  # (H, W, 3) uint8, what wandb.Image takes
