"""The LR schedule: warmup, then a cosine over whichever horizon ends first (steps, epochs, time)."""
import math

import pytest

from seqgen.train import TrainConfig, TrainState, lr_factor


def cosine(progress: float, floor: float = 0.1) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_warmup_then_cosine_over_steps():
    cfg = TrainConfig(warmup_steps=10, max_steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(cfg, TrainState(step=0)) == pytest.approx(0.1)
    assert lr_factor(cfg, TrainState(step=9)) == pytest.approx(1.0)
    assert lr_factor(cfg, TrainState(step=60)) == pytest.approx(cosine(0.5))
    assert lr_factor(cfg, TrainState(step=110)) == pytest.approx(0.1)


def test_cosine_decays_over_max_epochs_when_they_end_first():
    cfg = TrainConfig(warmup_steps=0, max_steps=10 ** 6, max_epochs=4, schedule="cosine")
    # epoch 1, 50 of 100 batches done: 1.5 of 4 epochs
    state = TrainState(step=150, epoch=1, batch_in_epoch=50)
    assert lr_factor(cfg, state, batches_per_epoch=100) == pytest.approx(cosine(1.5 / 4))
    assert lr_factor(cfg, TrainState(step=400, epoch=4), batches_per_epoch=100) == pytest.approx(0.1)
    # without the epoch length (or with the default 1000 epochs) the step horizon rules
    assert lr_factor(cfg, state) == pytest.approx(cosine(150 / 10 ** 6))
    long = TrainConfig(warmup_steps=0, max_steps=1000, schedule="cosine")
    assert lr_factor(long, TrainState(step=500, epoch=5), batches_per_epoch=100) == pytest.approx(cosine(0.5))


def test_cosine_decays_over_the_time_budget_when_it_ends_first():
    cfg = TrainConfig(warmup_steps=0, max_steps=10 ** 6, time_budget=10.0, schedule="cosine")
    assert lr_factor(cfg, TrainState(step=5, train_seconds=300.0)) == pytest.approx(cosine(0.5))


def test_constant_schedule_ignores_horizons():
    cfg = TrainConfig(warmup_steps=0, max_steps=10, max_epochs=1, schedule="constant")
    assert lr_factor(cfg, TrainState(step=9, epoch=0, batch_in_epoch=9), batches_per_epoch=10) == 1.0
