"""Sparse (row-wise) optimizer updates for large embedding tables.

Why this module exists
----------------------
Keras 3 optimizers update every variable *densely*. The gradient of an embedding lookup arrives
as a `tf.IndexedSlices` (only the looked-up rows), but `keras.optimizers.Adam.update_step`
computes `m += (g - m) * (1 - beta_1)` etc. on the whole variable, which turns the slices into
a dense tensor and then reads and writes every row of the table and of its slot variables. A
training step therefore costs time proportional to the number of rows: a 500,000 x 32 item
table is updated (table, m, v: ~200 MB of memory traffic) on every step even though a batch of
1,024 touches at most 1,024 rows.

What belongs here: the two pieces that make a step cost independent of the table size, and
nothing else.

* `SparseAwareOptimizer`: for every variable whose gradient is a `tf.IndexedSlices` it applies a
  row-wise update to the touched rows only; every other gradient (dense layers, biases) goes to
  an ordinary Keras 3 optimizer (`dense_optimizer`, Adam by default). The cost of the sparse part
  is O(unique ids in the batch x dim), independent of the table size.
* `SparseEmbedding`: a drop-in `keras.layers.Embedding` whose lookup does not read the whole
  table (see below; without it the step still grows with the table).

The sparse update:

1. deduplicates the ids: `tf.unique` + `tf.math.unsorted_segment_sum`, so an id that occurs k
   times in a batch receives the *sum* of its k gradient rows once (the same as the dense
   gradient), not k separate updates;
2. reads the touched rows of the slot variables with `ResourceGather` (`Variable.sparse_read`),
   computes the new rows, and writes them back with `ResourceScatterUpdate`/`ResourceScatterSub`
   (`Variable.scatter_update`/`scatter_sub`). No `tf.tensor_scatter_nd_*` (those copy the whole
   table) and no dense read of the table anywhere.

Why the lookup has to change too (`SparseEmbedding`)
----------------------------------------------------
`keras.layers.Embedding` looks rows up with `keras.ops.take`, which on the TensorFlow backend
first reads the *whole* table as a dense tensor (`ReadVariableOp`) and then gathers from it. That
read is free (an alias) as long as the variable has only been updated densely. But the first
sparse resource op on a variable (`ResourceScatter*`, `ResourceGather`) switches it to TF's
"copy-on-read" mode for good, and from then on every dense read *copies the whole table*
(measured: 0.3 ms -> 5.5 ms for a 500k x 32 lookup). With plain `keras.layers.Embedding` the
sparse optimizer is still faster than Keras Adam, but the step again grows with the table
(~2x from 5k to 500k rows; `tests/benchmarks/bench_sparse_step.py`, variant `sparse_opt_only`).
The same holds for any other dense read of a sparsely updated table inside the step (a
regularizer, `table @ x`): each one copies the table. `SparseEmbedding.call` gathers straight from the variable
(`ResourceGather`, no dense read), whose gradient is an `IndexedSlices` as well, so forward,
backward and update all cost O(batch x dim).

Algorithms (`algorithm=`):

* `"adagrad"` (default): Keras' `Adagrad` formula (`acc += g^2; var -= lr * g / sqrt(acc + eps)`,
  accumulator starts at `initial_accumulator_value`). A row with zero gradient would not move
  under dense Adagrad either, so the result equals Keras' Adagrad fed the *dense* gradient, for
  the whole table. (Keras' Adagrad fed the `IndexedSlices` itself squares each occurrence of a
  repeated id separately, which is not the dense result.)
* `"lazy_adam"`: Keras' `Adam` formula applied to the touched rows only ("lazy Adam", as in
  TF1's `LazyAdamOptimizer`): the moments of a row are only decayed on steps in which the row
  occurs. Bias correction uses the global step (`optimizer.iterations`). This is *not* identical
  to dense Adam (which keeps moving rows with stale momentum), but it is the standard choice for
  sparse embeddings.

Usage, custom training loop (the primary API)::

    opt = SparseAwareOptimizer(learning_rate=0.05, dense_optimizer=keras.optimizers.Adam(1e-3))

    @tf.function
    def train_step(batch):
        with tf.GradientTape() as tape:
            loss = loss_fn(model(batch))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply(grads, model.trainable_variables)   # IndexedSlices -> rows, dense -> Adam
        return loss

(with the tables built from `SparseEmbedding`). `apply` also works eagerly, but use
`tf.function` for speed.

Usage, Keras `fit`: it is a `keras.optimizers.Optimizer`, so build the tables with
`SparseEmbedding` and `model.compile(optimizer=SparseAwareOptimizer(...), loss=...)`; `fit`,
`evaluate` and `model.save` work unchanged.

Caveats:

* XLA: checked on CPU only (`jit_compile=True` gives the same numbers and stays O(batch), but
  was ~2x slower per step than without XLA). Keras' `jit_compile="auto"` turns XLA off on
  CPU-only machines; on a GPU it would turn it on, which is untested here.
* Which path a variable takes is decided by its gradient type on the first `apply`, and must stay
  the same afterwards. An embedding with an `embeddings_regularizer`, or a table used in a dense
  op (e.g. `table @ x` over all rows), produces a dense gradient and silently takes the (correct,
  O(rows)) dense path. Variable constraints on sparse variables are rejected.
* Slot variables are created on the first `apply` (not in `build`), because only then are the
  gradient types known. `tf.train.Checkpoint` restores them (deferred restoration); restoring the
  optimizer state from a `.keras` file is *not* supported (Keras warns and skips it; the model
  weights load fine).
* Determinism: on CPU the update is deterministic (same inputs, bitwise same tables). The
  scatters write each row once (ids are deduplicated first), so their order does not matter; on
  GPU the default `unsorted_segment_sum` kernel may sum a repeated id's rows in varying order
  (untested here): use `tf.config.experimental.enable_op_determinism()` if you need bitwise
  reproducibility there.
* Not supported (rejected in `__init__`): clipping, weight decay, EMA, gradient accumulation,
  on either path: the dense gradients go through `dense_optimizer`'s update rule
  (`update_step`) directly, not through its `apply` (which on TensorFlow keeps every traced
  step's graph alive; see `_apply_dense`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

ALGORITHMS = ("adagrad", "lazy_adam")
# What a Keras optimizer's `apply` does beyond its `update_step` (`_apply_dense` calls only that)
_APPLY_ONLY = (
    "clipnorm", "clipvalue", "global_clipnorm", "gradient_accumulation_steps", "loss_scale_factor",
    "use_ema", "weight_decay",
)  # fmt: skip


def _tf_variable(variable) -> tf.Variable:
    """The underlying `tf.Variable` (a Keras 3 `keras.Variable` wraps one as `.value`)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def deduplicate(grad: tf.IndexedSlices) -> tuple[tf.Tensor, tf.Tensor]:
    """(summed_rows, unique_ids): the gradient rows of repeated ids summed, one row per id."""
    unique_ids, position = tf.unique(grad.indices)
    summed = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(unique_ids)[0])
    return summed, unique_ids


@keras.saving.register_keras_serializable(package="embedpipe")
class SparseEmbedding(keras.layers.Embedding):
    """`keras.layers.Embedding` whose lookup reads only the looked-up rows (`ResourceGather`).

    Same constructor, weights, config, masking and output as `keras.layers.Embedding`; only the
    TensorFlow op behind the lookup differs (see the module docstring for why that matters).
    Falls back to the parent's lookup for LoRA / quantized tables and non-TensorFlow backends.
    """

    def call(self, inputs):
        if keras.backend.backend() != "tensorflow" or self.lora_enabled or self.quantization_mode:
            return super().call(inputs)
        ids = inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, tf.int32)
        ids = tf.where(ids < 0, ids + self.input_dim, ids)  # negative ids as in keras.ops.take
        outputs = tf.gather(_tf_variable(self._embeddings), ids)  # ResourceGather on the variable
        return tf.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="embedpipe")
class SparseAwareOptimizer(keras.optimizers.Optimizer):
    """Row-wise Adagrad / lazy Adam for `IndexedSlices` gradients, a Keras optimizer for the rest.

    Args:
        learning_rate: learning rate of the *sparse* updates (float, `keras.Variable` or
            `LearningRateSchedule`, evaluated at `self.iterations`).
        dense_optimizer: Keras 3 optimizer for variables with dense gradients
            (default `keras.optimizers.Adam(1e-3)`). It keeps its own learning rate and state.
        algorithm: `"adagrad"` or `"lazy_adam"` (see the module docstring).
        initial_accumulator_value: Adagrad accumulator start value (Keras default 0.1).
        beta_1, beta_2: lazy Adam moment decay rates.
        epsilon: as in Keras' Adagrad / Adam.
        loss_scale_factor, name: as in `keras.optimizers.Optimizer`.
    """

    def __init__(
        self,
        learning_rate=0.05,
        dense_optimizer: keras.optimizers.Optimizer | None = None,
        algorithm: str = "adagrad",
        initial_accumulator_value: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        loss_scale_factor=None,
        name: str | None = None,
        **kwargs,
    ):
        unsupported = {k: v for k, v in kwargs.items() if v not in (None, False)}
        if unsupported:
            raise ValueError(
                f"SparseAwareOptimizer does not support {sorted(unsupported)} (neither on the sparse "
                "nor on the dense path)"
            )
        dense_optimizer = dense_optimizer if dense_optimizer is not None else keras.optimizers.Adam(1e-3)
        unused = [k for k in _APPLY_ONLY if getattr(dense_optimizer, k, None) not in (None, False, 0)]
        if unused:
            raise ValueError(
                f"dense_optimizer: {unused} are not applied (its update rule is used step by step); "
                "give it none of them"
            )
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        super().__init__(learning_rate=learning_rate, loss_scale_factor=loss_scale_factor, name=name)
        self.dense_optimizer = dense_optimizer
        self.algorithm = algorithm
        self.initial_accumulator_value = initial_accumulator_value
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        # Per-variable decisions, made on the first apply: var key -> list of slot variables
        # (sparse path) or None (dense path).
        self._routes: dict = {}

    # -- public API -------------------------------------------------------------------------

    def build(self, variables):
        """Records the variables. Slots are created on the first `apply` (see module docstring)."""
        if self.built:
            return
        super().build(variables)

    def apply(self, grads, trainable_variables=None):
        """Applies one step: `IndexedSlices` gradients row-wise, dense ones via `dense_optimizer`.

        `grads` and `trainable_variables` are parallel lists (as from `tape.gradient(loss, vars)`);
        `None` gradients are skipped. Works eagerly and inside `tf.function`.
        """
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError("pass trainable_variables on the first call (or call build() first)")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(f"{len(grads)} gradients for {len(trainable_variables)} variables")
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        self._check_variables_are_known(trainable_variables)

        sparse, dense = [], []
        for grad, var in zip(grads, trainable_variables):
            if grad is None:
                continue
            if self.loss_scale_factor is not None:
                grad = (
                    tf.IndexedSlices(grad.values / self.loss_scale_factor, grad.indices, grad.dense_shape)
                    if isinstance(grad, tf.IndexedSlices)
                    else grad / self.loss_scale_factor
                )
            (sparse if self._route(grad, var) else dense).append((grad, var))

        with keras.name_scope(self.name, caller=self):
            if dense:
                self._apply_dense(dense)
            if sparse:
                lr = self.learning_rate
                for grad, var in sparse:
                    self._apply_sparse(grad, var, lr)
        self._iterations.assign_add(1)

    def apply_gradients(self, grads_and_vars):
        """`apply` for `(gradient, variable)` pairs (what Keras' `fit` calls)."""
        pairs = list(grads_and_vars)
        self.apply([g for g, _ in pairs], [v for _, v in pairs])
        return self._iterations

    def slots(self, variable) -> dict[str, keras.Variable]:
        """The slot variables of a sparse-path variable by name ('accumulator' or 'm', 'v')."""
        slots = self._routes.get(self._var_key(variable))
        if slots is None:
            raise KeyError(f"{variable.name} has no sparse slots (not applied yet, or dense path)")
        names = ("accumulator",) if self.algorithm == "adagrad" else ("m", "v")
        return dict(zip(names, slots))

    def get_config(self):
        return {
            "name": self.name,
            "learning_rate": super().get_config()["learning_rate"],
            "dense_optimizer": keras.optimizers.serialize(self.dense_optimizer),
            "algorithm": self.algorithm,
            "initial_accumulator_value": self.initial_accumulator_value,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "loss_scale_factor": self.loss_scale_factor,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["dense_optimizer"] = keras.optimizers.deserialize(
            config["dense_optimizer"], custom_objects=custom_objects
        )
        if isinstance(config["learning_rate"], dict):
            config["learning_rate"] = keras.optimizers.schedules.deserialize(
                config["learning_rate"], custom_objects=custom_objects
            )
        return cls(**config)

    # -- internals --------------------------------------------------------------------------

    def _route(self, grad, var) -> bool:
        """True for the sparse path; creates the slots the first time a variable is seen."""
        key = self._var_key(var)
        is_sparse = isinstance(grad, tf.IndexedSlices)
        if key not in self._routes:
            if is_sparse:
                if getattr(var, "constraint", None) is not None:
                    raise ValueError(
                        f"{var.name}: variable constraints are not supported on the sparse path "
                        "(Keras would apply them to the whole table every step)"
                    )
                self._routes[key] = self._create_slots(var)
            else:
                self._routes[key] = None
        elif (self._routes[key] is not None) != is_sparse:
            raise ValueError(
                f"{var.name} got a {'sparse' if is_sparse else 'dense'} gradient but earlier steps "
                "gave the other kind; a variable must stay on one path"
            )
        return is_sparse

    def _create_slots(self, var) -> list:
        # init_scope: the first apply usually runs while a tf.function is being traced; the slot
        # variables must be created (and initialised) outside that graph, once.
        with tf.init_scope():
            if self.algorithm == "adagrad":
                init = keras.initializers.Constant(self.initial_accumulator_value)
                return [self.add_variable_from_reference(var, "accumulator", initializer=init)]
            return [
                self.add_variable_from_reference(var, "m"),
                self.add_variable_from_reference(var, "v"),
            ]

    def _apply_dense(self, dense: list) -> None:
        """The dense gradients through `dense_optimizer`'s update rule (`update_step`, one
        variable at a time, then its step count), not through its `apply`: on TensorFlow that
        all-reduces the gradients through a `tf.custom_gradient`, which in a traced step
        registers a gradient function in TensorFlow's global registry on every trace, and with it
        keeps the step's graph, and every table and optimizer slot the graph captured, alive for
        the rest of the process. With the options `__init__` rejects on it, `apply` does the same."""
        opt = self.dense_optimizer
        variables = [v for _, v in dense]
        if not opt.built:
            with tf.init_scope():
                opt.build(variables)
        learning_rate = opt.learning_rate
        for grad, var in dense:
            opt.update_step(grad, _tf_variable(var), tf.cast(learning_rate, var.dtype))
        opt.iterations.assign_add(1)

    def _apply_sparse(self, grad: tf.IndexedSlices, var, learning_rate) -> None:
        table = _tf_variable(var)
        dtype = table.dtype
        values, ids = deduplicate(grad)
        g = tf.cast(values, dtype)
        lr = tf.cast(learning_rate, dtype)
        eps = tf.cast(self.epsilon, dtype)
        slots = [_tf_variable(s) for s in self._routes[self._var_key(var)]]
        if self.algorithm == "adagrad":
            (acc,) = slots
            acc_rows = acc.sparse_read(ids) + tf.square(g)
            acc.scatter_update(tf.IndexedSlices(acc_rows, ids))
            table.scatter_sub(tf.IndexedSlices(lr * g / tf.sqrt(acc_rows + eps), ids))
        else:
            m, v = slots
            step = tf.cast(self.iterations + 1, dtype)
            beta_1 = tf.cast(self.beta_1, dtype)
            beta_2 = tf.cast(self.beta_2, dtype)
            alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
            m_rows = m.sparse_read(ids)
            m_rows = m_rows + (g - m_rows) * (1 - beta_1)
            v_rows = v.sparse_read(ids)
            v_rows = v_rows + (tf.square(g) - v_rows) * (1 - beta_2)
            m.scatter_update(tf.IndexedSlices(m_rows, ids))
            v.scatter_update(tf.IndexedSlices(v_rows, ids))
            table.scatter_sub(tf.IndexedSlices(m_rows * alpha / (tf.sqrt(v_rows) + eps), ids))
