"""Scale-out on the backend's own distribution: one device, all local devices, or
several processes (machines).

    plan = distribution.setup("auto")     # first thing: before any variable or JAX op
    with plan.scope():                     # build, compile and fit inside
        ...
    per_process = plan.per_process_batch(global_batch)

Kinds (`train.distribution`):
- "none": one device (the backend's default).
- "data_parallel": every local device, one process. JAX: `keras.distribution.DataParallel`
  (one SPMD program over a 1-D device mesh). TensorFlow: `tf.distribute.MirroredStrategy`
  over the GPUs, else over the (logical) CPUs.
- "multi_worker": several processes, each with its local devices. JAX:
  `jax.distributed.initialize(coordinator, num_processes, process_id)`, from the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
  (train.py's --coordinator_address/--num_processes/--process_id set them), then
  DataParallel over the devices of all processes. TensorFlow:
  `tf.distribute.MultiWorkerMirroredStrategy`, cluster from TF_CONFIG.
- "auto": multi_worker when those variables name more than one process (JAX) or
  TF_CONFIG more than one worker (TF); else data_parallel with more than one local
  device; else none.

The global batch is split evenly over the replicas (devices of all processes); each
process feeds `global / num_processes` examples per step from its own subset of the
training shards. Only the chief (process 0) writes the workdir.
"""

import contextlib
import dataclasses
import json
import os

import keras
from absl import logging

KINDS = ("auto", "none", "data_parallel", "multi_worker")
LR_SCALINGS = ("none", "linear")
JAX_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The resolved distribution of this process.

    kind: "none" | "data_parallel" | "multi_worker".
    num_replicas: devices the global batch is split over (all processes).
    num_processes, process_id: 1, 0 unless multi_worker.
    engine: tf.distribute.Strategy (TF), keras.distribution.Distribution (JAX) or None.
    """

    kind: str
    num_replicas: int = 1
    num_processes: int = 1
    process_id: int = 0
    engine: object = None

    @property
    def is_chief(self) -> bool:
        """The one process that writes checkpoints, TensorBoard and workdir files."""
        return self.process_id == 0

    @property
    def backend(self) -> str:
        return keras.backend.backend()

    def scope(self):
        """Context in which models are built, compiled and fitted."""
        return self.engine.scope() if self.engine is not None else contextlib.nullcontext()

    def per_process_batch(self, global_batch: int) -> int:
        """Examples each process feeds per step; raises ValueError unless the global
        batch divides evenly over the replicas."""
        if global_batch % self.num_replicas:
            raise ValueError(
                f"train.batch_size={global_batch} (the global batch) must be divisible by "
                f"the {self.num_replicas} replicas of distribution {self.kind!r}; use e.g. "
                f"{max(1, global_batch // self.num_replicas) * self.num_replicas}")
        return global_batch // self.num_processes

    def shard(self) -> tuple[int, int] | None:
        """(num_shards, index) of the training files this process reads, or None."""
        return (self.num_processes, self.process_id) if self.num_processes > 1 else None

    def distribute(self, dataset):
        """The per-process tf.data `dataset` as `fit` must get it: TF multi-worker wraps
        it per worker (no re-sharding, no re-batching: each process has one device,
        whose batch it is); elsewhere unchanged (Keras splits each batch over the
        local devices)."""
        if self.backend == "tensorflow" and self.kind == "multi_worker":
            return self.engine.distribute_datasets_from_function(lambda context: dataset)
        return dataset


def each_opening_alike(make):
    """The tf.data dataset `make()` returns, rebuilt each time it is opened (iterated),
    so that every opening yields the same stream.

    `make`: () -> tf.data.Dataset, e.g. a training pipeline whose shuffles reshuffle on
    each opening (`reshuffle_each_iteration=True`). Those draw their seeds from a seed
    generator that lives as long as the dataset, so the k-th opening gives the k-th
    order. Keras 3.15's TensorFlow `fit` opens its data twice under a tf.distribute
    strategy (once to build the model symbolically from a peeked batch, then to
    train) but once on one device or JAX, so without this a strategy trained on
    another order than one device. Options and cardinality are those of `make()`.
    """
    import tensorflow as tf

    first = make()  # built, not iterated: its options and cardinality
    fresh = tf.data.Dataset.range(1).flat_map(
        tf.autograph.experimental.do_not_convert(lambda _: make()))
    cardinality = int(first.cardinality())
    if cardinality >= 0 or cardinality == tf.data.INFINITE_CARDINALITY:
        fresh = fresh.apply(tf.data.experimental.assert_cardinality(cardinality))
    return fresh.with_options(first.options())


def scaled_learning_rate(learning_rate: float, lr_scaling: str, plan: Plan) -> float:
    """"none": `learning_rate` as given; "linear": times the replica count (Goyal et
    al. 2017), for a rate tuned on one device with batch_size / num_replicas."""
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"train.lr_scaling must be one of {LR_SCALINGS}, got {lr_scaling!r}")
    return learning_rate * (plan.num_replicas if lr_scaling == "linear" else 1)


_CURRENT: Plan | None = None  # a process joins one cluster, once


def setup(kind: str = "auto") -> Plan:
    """Resolves `kind` (see the module docstring) and starts the backend's distribution.

    Call before any model exists (and, for multi_worker on JAX, before any JAX op).
    A second call in the same process returns the first multi_worker plan (a process
    cannot join two clusters); other kinds are rebuilt each call.
    """
    if kind not in KINDS:
        raise ValueError(f"train.distribution must be one of {KINDS}, got {kind!r}")
    global _CURRENT
    if _CURRENT is not None and _CURRENT.kind == "multi_worker":
        return _CURRENT
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        if kind not in ("auto", "none"):
            raise ValueError(f"train.distribution={kind!r} needs the JAX or TensorFlow "
                             f"backend, not {backend!r}")
        return Plan("none")
    if kind == "auto":
        kind = _auto_kind(backend)
    plan = (_setup_jax if backend == "jax" else _setup_tf)(kind)
    logging.info("distribution: %s, %d replicas, process %d of %d", plan.kind,
                 plan.num_replicas, plan.process_id, plan.num_processes)
    _CURRENT = plan
    return plan


def _jax_cluster() -> tuple[str, int, int] | None:
    """(coordinator address, process count, process id) from JAX_* variables, or None."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return None
    missing = [name for name in JAX_ENV[1:] if name not in os.environ]
    if missing:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} not "
                         "(pass --num_processes and --process_id)")
    return address, int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])


def _tf_workers() -> int:
    """Number of workers (chief included) in TF_CONFIG; 0 without it."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def _auto_kind(backend: str) -> str:
    if backend == "jax":
        cluster = _jax_cluster()
        if cluster and cluster[1] > 1:
            return "multi_worker"
        import jax

        return "data_parallel" if jax.local_device_count() > 1 else "none"
    if _tf_workers() > 1:
        return "multi_worker"
    return "data_parallel" if len(_tf_devices()) > 1 else "none"


def _setup_jax(kind: str) -> Plan:
    import jax

    if kind == "none":
        return Plan("none")
    num_processes, process_id = 1, 0
    if kind == "multi_worker":
        cluster = _jax_cluster()
        if cluster is None:
            raise ValueError("train.distribution='multi_worker' on JAX needs "
                             "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                             "(or train.py --coordinator_address/--num_processes/--process_id)")
        address, num_processes, process_id = cluster
        jax.distributed.initialize(address, num_processes, process_id)
    devices = jax.devices()  # every process's devices: one global mesh
    # auto_shard_dataset=False: each process already reads its own files at the
    # per-process batch (Keras' own sharding would read every file everywhere).
    engine = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
    return Plan(kind, len(devices), num_processes, process_id, engine)


def _tf_devices() -> list[str]:
    """GPUs when there are any, else the logical CPUs (names for MirroredStrategy)."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def _setup_tf(kind: str) -> Plan:
    import tensorflow as tf

    if kind == "none":
        return Plan("none")
    if kind == "data_parallel":
        devices = _tf_devices()
        return Plan(kind, len(devices), engine=tf.distribute.MirroredStrategy(devices))
    if _tf_workers() < 1:
        raise ValueError("train.distribution='multi_worker' on TensorFlow needs TF_CONFIG "
                         "(cluster.worker addresses and this task's index)")
    strategy = _multi_worker_strategy_class()()
    resolver = strategy.cluster_resolver
    task = json.loads(os.environ["TF_CONFIG"]).get("task", {})
    process_id = int(resolver.task_id) + (1 if task.get("type") == "worker"
                                          and "chief" in resolver.cluster_spec().jobs else 0)
    if strategy.num_replicas_in_sync != _tf_workers():
        # Plan.distribute hands each process's batch to its one replica; several local
        # GPUs would each take a whole per-process batch.
        raise ValueError(f"train.distribution='multi_worker' on TensorFlow runs one device "
                         f"per process, but this one has "
                         f"{strategy.num_replicas_in_sync // _tf_workers()}: start one "
                         "process per GPU (CUDA_VISIBLE_DEVICES), or use JAX")
    return Plan(kind, strategy.num_replicas_in_sync, _tf_workers(), process_id, strategy)


# dtypes TF's collective all-reduce takes (CollectiveReduceV2).
_COLLECTIVE_DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64")


def _multi_worker_strategy_class():
    """tf.distribute.MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3.15's
    TF `fit` hands it, as MirroredStrategy's does.

    Without it `fit` fails on two calls of Keras' trainer (2 processes, Keras 3.15.1,
    TF 2.21.0): it reduces the whole peeked (images, labels) batch, a nest of
    PerReplica, which only MirroredStrategy maps over ("Attempt to convert a value
    (PerReplica ...) to a Tensor"); then it reduces each scalar metric with axis=0
    ("Invalid reduction dimension 0 for input with 0 dimensions", also
    tensorflow/tensorflow#72388). Here a nest is reduced leaf by leaf, axis is
    dropped for scalars, and dtypes the collectives refuse (uint8 images) are reduced
    as float32 and cast back. Keras only reads the peeked batch's shapes.
    """
    import tensorflow as tf

    class MultiWorkerMirrored(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            return tf.nest.map_structure(lambda v: self._reduce_one(reduce_op, v, axis),
                                         value)

        def _reduce_one(self, reduce_op, value, axis):
            local = self.experimental_local_results(value)
            if local[0].shape.rank == 0:
                axis = None
            dtype = local[0].dtype
            if dtype.name in _COLLECTIVE_DTYPES:
                return super().reduce(reduce_op, value, axis)
            as_float = self.experimental_distribute_values_from_function(
                lambda context: tf.cast(local[context.replica_id_in_sync_group % len(local)],
                                        tf.float32))
            return tf.cast(super().reduce(reduce_op, as_float, axis), dtype)

    return MultiWorkerMirrored


def uses_cpu_strategy(plan: Plan) -> bool:
    """A TF strategy over CPU devices, where jit_compile fails (PITFALLS section 9)."""
    if plan.backend != "tensorflow" or plan.kind == "none":
        return False
    import tensorflow as tf

    return not tf.config.list_logical_devices("GPU")


def synchronize_batchnorm(model, plan: Plan | None) -> int:
    """Under a TF strategy with several replicas, BatchNormalization computes its batch
    statistics over the global batch (`synchronized=True`), as one device does and as
    JAX's single SPMD program does anyway; per-replica statistics would change what is
    trained. `plan=None` turns it off again: call that before saving a model, since a
    saved `synchronized=True` layer does not load on JAX. Returns the layers changed."""
    on = plan is not None and plan.backend == "tensorflow" and plan.num_replicas > 1
    norms = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
             if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.synchronized = on
    return len(norms) if on else 0
