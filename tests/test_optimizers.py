"""training/optimizers.py: per-group learning rates, weight-decay exclusion, schedule."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import optimizers


def _tiny_model(seed: int = 0) -> keras.Model:
    """image [B, 4] -> nested "backbone" (Dense+LayerNorm) -> "logits" Dense(2)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,))
    h = keras.layers.LayerNormalization(name="norm")(keras.layers.Dense(3, name="d1")(inp))
    backbone = keras.Model(inp, h, name="backbone")
    x = keras.Input((4,), name="image")
    model = keras.Model(x, keras.layers.Dense(2, name="logits")(backbone(x)))
    return model


def _one_step(model, optimizer, loss_scale: float = 1.0) -> dict:
    """Applies one gradient step of a fixed quadratic loss; returns |Δw| per variable path."""
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    with tf.GradientTape() as tape:
        loss = loss_scale * tf.reduce_mean(tf.square(model(x) - 1.0))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)
    return {v.path: np.abs(v.numpy() - before[v.path]) for v in model.trainable_variables}


def _groups(model):
    backbone = {v.path for v in optimizers.backbone_variables(model)}
    head = {v.path for v in model.trainable_variables} - backbone
    return backbone, head


def test_backbone_paths_lack_backbone_name():
    # The reason exact paths are mapped (PITFALLS section 6): a regex would miss them.
    backbone, head = _groups(_tiny_model())
    assert backbone and head
    assert not any(p.startswith("backbone/") for p in backbone)


def test_multi_optimizer_sgd_steps_scale_with_group_lr():
    model_a, model_b = _tiny_model(), _tiny_model()
    sgd = keras.optimizers.SGD  # no momentum: the step is exactly lr * grad
    multi = optimizers.multi_optimizer(model_a, sgd(0.01, name="backbone"), sgd(0.2, name="head"))
    ref = keras.optimizers.SGD(1.0)  # the plain gradient, to divide out
    d_multi, d_ref = _one_step(model_a, multi), _one_step(model_b, ref)
    backbone, head = _groups(model_a)
    for paths, lr in ((backbone, 0.01), (head, 0.2)):
        for p in paths:
            mask = d_ref[p] > 1e-6
            np.testing.assert_allclose(d_multi[p][mask] / d_ref[p][mask], lr, rtol=1e-3)
    assert optimizers.group_iterations(multi) == {"backbone": 1, "head": 1}


def test_build_optimizer_adamw_first_step_equals_group_lr():
    model = _tiny_model()
    opt = optimizers.build_optimizer(
        model, learning_rate=1e-2, total_steps=100, warmup_steps=0, weight_decay=0.0,
        backbone_lr_factor=1 / 15, head_lr_factor=0.8)
    assert isinstance(opt, keras.optimizers.MultiOptimizer)
    delta = _one_step(model, opt)
    backbone, head = _groups(model)
    # Adam's first step is lr * g / (|g| + eps) ~= lr for every non-zero gradient.
    for paths, lr in ((backbone, 1e-2 / 15), (head, 1e-2 * 0.8)):
        for p in paths:
            moved = delta[p][delta[p] > 0]
            np.testing.assert_allclose(moved, lr, rtol=1e-2)
    assert optimizers.group_iterations(opt) == {"backbone": 1, "head": 1}
    lrs = optimizers.current_learning_rates(opt)
    assert lrs["backbone"] == pytest.approx(1e-2 / 15 * 0.5 * (1 + np.cos(np.pi / 100)), rel=1e-4)


def test_single_group_without_factor():
    model = _tiny_model()
    opt = optimizers.build_optimizer(model, learning_rate=1e-3, total_steps=10)
    assert set(optimizers.sub_optimizers(opt)) == {"adamw"}


def test_weight_decay_skips_biases_and_norms():
    model = _tiny_model()
    opt = optimizers.build_optimizer(model, learning_rate=0.1, total_steps=10, weight_decay=0.5)
    # Zero loss: Adam moves nothing, so any change is decoupled weight decay.
    delta = _one_step(model, opt, loss_scale=0.0)
    for v in model.trainable_variables:
        if len(v.shape) <= 1:
            assert delta[v.path].max() == 0.0, v.path
        else:
            np.testing.assert_allclose(delta[v.path], 0.1 * 0.5 * np.abs(v.numpy()) / (1 - 0.05),
                                       rtol=1e-4)


def test_schedule_warms_up_linearly_then_decays_to_min():
    sched = optimizers.lr_schedule(1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lr = [float(sched(s)) for s in (0, 5, 10, 60, 110)]
    assert lr[0] == pytest.approx(0.0)
    assert lr[1] == pytest.approx(0.5)
    assert lr[2] == pytest.approx(1.0)
    assert lr[3] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-4)
    assert lr[4] == pytest.approx(0.1, rel=1e-4)
