"""Where training augments: on the host (tf.data) or on the device (inside the step).

`augment_on="device"` keeps the network untouched and trains an `AugmentingModel`
around it: the batch's un-augmented uint8 images and their augmentation parameters go
to the accelerator, and `device_augment.DeviceAugment` applies them inside the compiled
training step before the network sees them. Validation, evaluation and serving call the
network itself, so what is saved and exported is the same in both modes.
"""

import keras

from input_pipeline import augment, device_augment

AUGMENT_ON = ("auto", "host", "device")


def resolve(augment_on: str, config: augment.AugmentConfig) -> str:
    """"host" or "device" for `augment_on` in AUGMENT_ON.

    "auto" is "device" when Keras sees an accelerator and `config` has no host-only op:
    there the CPU cores cannot augment as fast as the accelerator trains. On a CPU-only
    machine both would share the same cores, and tf.data overlaps with the step.
    """
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
    unsupported = augment.device_unsupported(config)
    if augment_on == "device" and unsupported:
        raise ValueError(f"augment_on='device' does not run {unsupported}; set them to 0 "
                         "or use augment_on='host'")
    if augment_on != "auto":
        return augment_on
    on_accelerator = any(not d.lower().startswith("cpu")
                         for d in keras.distribution.list_devices())
    return "device" if on_accelerator and not unsupported else "host"


class AugmentingModel(keras.Model):
    """`network` trained on batches augmented inside the step.

    Call with {"image": uint8 [B, S, S, 3], "augment": float32 [B, DEVICE_PARAMS]}
    (training batches of `make_dataset(augment_on="device")`) or with plain images
    (validation batches: passed to the network as they are). Has no weights of its own:
    its variables are the network's, so the optimizer, EMA and BackupAndRestore see the
    same state; checkpoints meant for evaluation save `network_of(model)`.
    """

    def __init__(self, network: keras.Model, config: augment.AugmentConfig, **kwargs):
        super().__init__(name=f"{network.name}_augmenting", **kwargs)
        self.network = network
        self.augment = device_augment.DeviceAugment(config.fundus_aware, config.field_radius)
        self.built = network.built

    def __setattr__(self, name, value):
        # Keras' JAX `fit` stores its state (every variable's array) in `_jax_state` at
        # every step. Layer.__setattr__ walks such a value to track variables and layers,
        # of which it holds none: on an H200 that walk was 6 ms of the training thread per
        # MobileNetV3 step, whose compiled step takes 8 ms (train_e2e.py --profile_dir).
        if name == "_jax_state":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def call(self, inputs, training=False):
        if isinstance(inputs, dict):
            inputs = self.augment(inputs["image"], inputs["augment"], training=training)
        return self.network(inputs, training=training)


def network_of(model: keras.Model) -> keras.Model:
    """The network inside an `AugmentingModel`, or `model` itself."""
    return model.network if isinstance(model, AugmentingModel) else model


def augmented_images(inputs, config: augment.AugmentConfig):
    """Training batch inputs -> float32 [B, S, S, 3] augmented images (numpy), for
    logging what the network sees (plain images are returned as they are).

    On JAX `device_augment.apply` runs as one compiled program: called eagerly, each of
    its ~60 ops would be a program of its own, traced and compiled (or loaded from the
    persistent cache) one by one before the first training step.
    """
    if not isinstance(inputs, dict):
        return inputs
    apply = device_augment.apply
    if keras.backend.backend() == "jax":
        import jax

        apply = jax.jit(apply, static_argnums=(2, 3))
    images = apply(inputs["image"], inputs["augment"], config.fundus_aware,
                   config.field_radius)
    return keras.ops.convert_to_numpy(images)
