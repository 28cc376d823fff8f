"""AdamW, the warmup + cosine schedule, and discriminative (per-group) learning rates.

Two parameter groups are used throughout: "backbone" (the nested keras.Model named
"backbone") and "head" (everything else: gap, dropout, logits). With
`backbone_lr_factor=None` one AdamW trains everything at the base rate; otherwise a
`keras.optimizers.MultiOptimizer` holds one AdamW per group, each with its own
schedule (the RFMiD system: backbone at base / 15, head at base * 0.8).

The MultiOptimizer maps EXACT variable paths (docs/PITFALLS section 6: a nested
backbone's paths don't contain "backbone", so a "backbone/.*" regex silently
matches nothing). `group_iterations` lets callers check every group stepped.
"""

import math

import keras

BACKBONE, HEAD, SINGLE = "backbone", "head", "adamw"


def group_names(backbone_lr_factor: float | None) -> tuple[str, ...]:
    """Names of the optimizer groups `build_optimizer` makes for this setting."""
    return (SINGLE,) if backbone_lr_factor is None else (BACKBONE, HEAD)


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0,
                min_lr_ratio: float = 0.0) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warmup from 0 to `base_lr` over `warmup_steps`, then cosine to base * ratio.

    Args:
        base_lr: peak learning rate (> 0).
        total_steps: optimizer steps over the whole run, warmup included (>= 1).
        warmup_steps: linear-warmup steps (0 disables warmup).
        min_lr_ratio: final learning rate as a fraction of `base_lr`, in [0, 1].
    """
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps) - 1))
    decay_steps = max(1, int(total_steps) - warmup_steps)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(base_lr, decay_steps, alpha=min_lr_ratio)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=decay_steps, alpha=min_lr_ratio,
        warmup_target=base_lr, warmup_steps=warmup_steps)


def adamw(learning_rate, weight_decay: float, no_decay_vars=(), *, name: str,
          use_ema: bool = False, ema_overwrite_frequency: int | None = None,
          clipnorm: float | None = None) -> keras.optimizers.AdamW:
    """One AdamW; `no_decay_vars` (norm scales/offsets, biases) get no weight decay.

    With `use_ema`, Keras copies the moving average into the model every
    `ema_overwrite_frequency` steps (pass steps per epoch so that validation and
    checkpoints see EMA weights).
    """
    opt = keras.optimizers.AdamW(
        learning_rate=learning_rate, weight_decay=weight_decay, clipnorm=clipnorm,
        use_ema=use_ema, ema_overwrite_frequency=ema_overwrite_frequency if use_ema else None,
        name=name)
    opt.exclude_from_weight_decay(var_list=list(no_decay_vars))
    return opt


def no_decay_variables(variables) -> list:
    """Biases and normalisation scales/offsets: every trainable variable of rank <= 1."""
    return [v for v in variables if len(v.shape) <= 1]


def build_optimizer(model: keras.Model, *, learning_rate: float, total_steps: int,
                    warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                    weight_decay: float = 0.05, backbone_lr_factor: float | None = None,
                    head_lr_factor: float = 1.0, use_ema: bool = False,
                    ema_overwrite_frequency: int | None = None,
                    clipnorm: float | None = None) -> keras.optimizers.Optimizer:
    """AdamW over `model.trainable_variables`, one group or two (see module docstring).

    Must be called after the model is built and its trainable flags are final (a
    frozen backbone has no trainable variables, so it gets no group).

    Args:
        model: a built model with a nested "backbone" sub-model when groups are used.
        learning_rate: base (peak) learning rate.
        total_steps, warmup_steps, min_lr_ratio: see `lr_schedule`.
        backbone_lr_factor: None for one group; else backbone LR = base * factor.
        head_lr_factor: head LR = base * factor (only with two groups).
    """
    trainable = model.trainable_variables
    no_decay = no_decay_variables(trainable)
    common = dict(use_ema=use_ema, ema_overwrite_frequency=ema_overwrite_frequency,
                  clipnorm=clipnorm)

    def group(factor, name):
        sched = lr_schedule(learning_rate * factor, total_steps, warmup_steps, min_lr_ratio)
        return adamw(sched, weight_decay, no_decay, name=name, **common)

    if backbone_lr_factor is None:
        return group(1.0, SINGLE)
    if not backbone_variables(model):  # frozen backbone: the head group alone
        return group(head_lr_factor, HEAD)
    return multi_optimizer(model, group(backbone_lr_factor, BACKBONE),
                           group(head_lr_factor, HEAD))


def multi_optimizer(model: keras.Model, backbone_opt, head_opt):
    """MultiOptimizer: backbone variables (mapped by exact path) -> backbone_opt, rest -> head_opt.

    The two optimizers must be distinct instances named after their group.
    """
    paths = {v.path: backbone_opt for v in backbone_variables(model)}
    return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(head_opt, paths))


def backbone_variables(model: keras.Model) -> list:
    """Trainable variables of the nested "backbone" sub-model ([] if absent or frozen)."""
    try:
        return list(model.get_layer(BACKBONE).trainable_variables)
    except ValueError:  # no nested backbone: a single group
        return []


def sub_optimizers(optimizer: keras.optimizers.Optimizer) -> dict:
    """{group name: optimizer}; unwraps LossScaleOptimizer; one entry without groups."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    subs = getattr(optimizer, "optimizers", None)
    return {o.name: o for o in subs} if subs else {optimizer.name: optimizer}


def group_iterations(optimizer: keras.optimizers.Optimizer) -> dict:
    """{group name: int steps applied}: every group must advance with the model."""
    return {name: int(o.iterations.numpy()) for name, o in sub_optimizers(optimizer).items()}


def current_learning_rates(optimizer: keras.optimizers.Optimizer) -> dict:
    """{group name: float learning rate at the optimizer's current step}."""
    out = {}
    for name, opt in sub_optimizers(optimizer).items():
        lr = float(keras.ops.convert_to_numpy(opt.learning_rate))
        out[name] = lr if math.isfinite(lr) else float("nan")
    return out
