"""The training loop and what it needs: config, model and data, learning rates, checkpoints, and
the `Engine` interface behind which either engine runs.

    from layerpipe.training import TrainConfig, train
    result = train(TrainConfig(model="cnn1d", stages="4", weights="ema"))

Modules: `config` (TrainConfig, recipes), `build` (model, data, optimizers, evaluation),
`lr` (per epoch and per stage), `checkpoint` (verified, atomic, both engines), `engines`
(the interface and its two implementations), `loop` (the one loop).
"""
from layerpipe.training.build import build, epoch_order, evaluate, make_optimizer_factory, split_blocks
from layerpipe.training.checkpoint import check_checkpoint_config
from layerpipe.training.config import LR_SCHEDULES, OPTIMIZERS, RECIPES, STAGE_LRS, TrainConfig, weight_choices
from layerpipe.training.loop import TrainResult, train
from layerpipe.training.engines import CustomModel
from layerpipe.training.lr import epoch_lr, set_lr

__all__ = ["CustomModel", "LR_SCHEDULES", "OPTIMIZERS", "RECIPES", "STAGE_LRS", "TrainConfig", "TrainResult", "build",
           "check_checkpoint_config", "epoch_lr", "epoch_order", "evaluate", "make_optimizer_factory", "set_lr",
           "split_blocks", "train", "weight_choices"]
