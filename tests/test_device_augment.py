"""Augmentation on the device (inside the training step) equals the host's tf.data one:
same random draws, same pixels up to float rounding; training with it saves the bare
network, which evaluation loads."""

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import augment as aug
from input_pipeline import device_augment, pipeline
from training import augmenting

SIZE = 48
CONFIGS = {
    "fundus": aug.AugmentConfig(),
    "oct": aug.config_for_modality("oct"),
    "flips only": aug.AugmentConfig(rotation_degrees=0.0, scale_range=(1.0, 1.0),
                                    translate=0.0, brightness=0.0, contrast=0.0,
                                    saturation=0.0, hue=0.0),
    "strong colour, zoom out": aug.AugmentConfig(scale_range=(0.7, 1.3), brightness=0.5,
                                                 contrast=0.5, saturation=0.5, hue=0.2),
}


def _photo(seed: int = 0) -> tf.Tensor:
    """A bright disc on black with noise: float32 [SIZE, SIZE, 3] in [0, 255]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SIZE, :SIZE]
    disc = ((x - SIZE / 2) ** 2 + (y - SIZE / 2) ** 2 < (0.45 * SIZE) ** 2)[..., None]
    return tf.constant(disc * rng.uniform(40, 250, (SIZE, SIZE, 3)), tf.float32)


@pytest.mark.parametrize("name", CONFIGS)
def test_device_ops_give_the_host_pixels(name):
    config, image = CONFIGS[name], _photo()
    seeds = [tf.constant([7, i], tf.int64) for i in range(6)]
    host = np.stack([aug.augment(image, config, s).numpy() for s in seeds])
    params = tf.stack([aug.device_params(image, config, s) for s in seeds])
    device = np.asarray(device_augment.apply(tf.stack([image] * 6), params,
                                             config.fundus_aware, config.field_radius))
    assert params.shape == (6, aug.DEVICE_PARAMS)
    np.testing.assert_allclose(device, host, atol=1e-3)
    assert (device != tf.stack([image] * 6).numpy()).mean() > 0.3  # it did augment


def test_identity_parameters_leave_the_image_alone():
    image = _photo()
    identity = tf.constant([[1, 0, 0, 0, 1, 0, 0, 0, *np.eye(3).ravel(), 1]], tf.float32)
    out = device_augment.apply(image[None], identity, fundus_aware=False)
    np.testing.assert_allclose(np.asarray(out)[0], image.numpy(), atol=1e-4)
    # the layer passes images through outside training, whatever the parameters
    layer = device_augment.DeviceAugment()
    np.testing.assert_array_equal(np.asarray(layer(image[None], identity * 0, training=False)),
                                  image.numpy()[None])


def test_host_only_ops_are_refused_on_the_device():
    blurred = aug.AugmentConfig(blur_prob=0.5)
    with pytest.raises(ValueError, match="blur_prob"):
        aug.device_params(_photo(), blurred, tf.constant([0, 0], tf.int64))
    with pytest.raises(ValueError, match="blur_prob"):
        augmenting.resolve("device", blurred)
    with pytest.raises(ValueError, match="augment_on"):
        augmenting.resolve("gpu", aug.AugmentConfig())
    assert augmenting.resolve("auto", aug.AugmentConfig()) == "host"  # CPU-only here
    assert augmenting.resolve("auto", blurred) == "host"


def test_device_batches_augment_to_the_host_batches(tmp_path):
    """make_dataset(augment_on="device") + DeviceAugment == make_dataset(augment_on="host")
    batch for batch: the same examples, the same draws (up to rounding the input to uint8)."""
    from tests.test_train import write_shards

    data = write_shards(str(tmp_path / "data"), counts={"train": 24})
    common = dict(file_pattern=f"{data}/train-*.tfrecord", batch_size=8, training=True,
                  image_size=32, task="dr_grade", num_classes=5, seed=3, deterministic=True)
    host = pipeline.make_dataset(**common).take(2)
    device = pipeline.make_dataset(**common, augment_on="device").take(2)
    for (h_images, h_labels), (inputs, d_labels) in zip(host, device, strict=True):
        assert inputs["image"].dtype == tf.uint8
        assert inputs["augment"].shape == (8, aug.DEVICE_PARAMS)
        np.testing.assert_array_equal(d_labels, h_labels)
        augmented = augmenting.augmented_images({k: v.numpy() for k, v in inputs.items()},
                                                aug.AugmentConfig())
        np.testing.assert_allclose(augmented, h_images.numpy(), atol=1.0)


def check_grid_is_one_program():
    """JAX child: the input grid's augmentation is one compiled program giving the
    pixels of `device_augment.apply` called op by op."""
    from benchmarks.compile_clock import programs_during

    config = aug.AugmentConfig()
    images = np.stack([_photo(i).numpy() for i in range(4)]).astype("uint8")
    params = np.stack([aug.device_params(tf.constant(image, tf.float32), config,
                                         tf.constant([5, i], tf.int64)).numpy()
                       for i, image in enumerate(images)])
    eager, eager_programs = programs_during(lambda: np.asarray(device_augment.apply(
        images, params, config.fundus_aware, config.field_radius)))
    grid, programs = programs_during(lambda: augmenting.augmented_images(
        {"image": images, "augment": params}, config))
    assert programs == 1 and eager_programs > 20, (programs, eager_programs)
    np.testing.assert_allclose(grid, eager, rtol=0, atol=1e-2)


def test_input_grid_is_one_program_on_jax():
    from tests.jax_child import check_on_jax

    check_on_jax("from tests.test_device_augment import check_grid_is_one_program as c; c()")


def test_training_on_the_device_saves_the_network(tmp_path):
    """TF backend, CPU: a run with augment_on="device" (two stages, precise BN, the input
    grid) writes checkpoints of the bare network that `build_from_config` loads."""
    import keras

    from tests.test_train import _history, _train_in_process, write_shards
    from training import experiment

    data = write_shards(str(tmp_path / "data"))
    workdir = tmp_path / "w"
    summary = _train_in_process(workdir, data, "train.augment_on = 'device'",
                                "train.tensorboard = True", "train.freeze_backbone_epochs = 1",
                                "train.bn_recalibration_batches = 2")
    assert summary["augment_on"] == "device" and len(_history(workdir)) == 2
    net, _, _ = experiment.build_from_config(str(workdir))
    assert not isinstance(net, augmenting.AugmentingModel)
    logits = keras.ops.convert_to_numpy(net(np.zeros((1, 32, 32, 3), np.float32)))
    assert np.isfinite(logits).all()


def test_augmenting_model_stores_the_jax_fit_state_untracked():
    """`_jax_state` (set by Keras' JAX fit every step) is kept as given, not walked and
    wrapped by the tracker; the network is still tracked as a sub-layer."""
    import keras

    net = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(2)])
    model = augmenting.AugmentingModel(net, aug.AugmentConfig())
    state = {"trainable_variables": [v.value for v in net.trainable_variables]}
    model._jax_state = state
    assert model._jax_state is state
    assert net in model.layers
    assert len(model.trainable_variables) == len(net.trainable_variables) == 2
