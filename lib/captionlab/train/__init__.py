"""Training of the PEFT captioner: `loop` (accelerate loop, validation), `checkpoints` (exact resume),
`config` (TrainConfig and the params-file mapping), `data` (caption pairs). Run it with `captionlab train`."""

from captionlab.train.checkpoints import LATEST_NAME, STATE_NAME, latest_checkpoint
from captionlab.train.config import (TrainConfig, captioner_config, configs_from_params, load_train_params, train_config,
                                     train_setting)
from captionlab.train.data import CaptionData, evaluate_captions, load_split
from captionlab.train.loop import train, validate

__all__ = ["CaptionData", "LATEST_NAME", "STATE_NAME", "TrainConfig", "captioner_config", "configs_from_params",
           "evaluate_captions", "latest_checkpoint", "load_split", "load_train_params", "train", "train_config",
           "train_setting", "validate"]
