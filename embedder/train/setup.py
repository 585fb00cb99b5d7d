"""One run assembly: a train config's mesh, logical rules, model, optimizer, state shardings and
jitted step, for the trainer, `--compile_only` and the benchmarks."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import optax
from jax.sharding import Mesh

from embedder import sharding, xla_cpu_flags
from embedder.distill.signals import teacher_projection_dim
from embedder.model import EmbeddingModel, ModelConfig
from embedder.train.optim import make_optimizer
from embedder.train.state import TrainState, create_train_state, state_shardings_for
from embedder.train.step import jit_train_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainAssembly:
    """What `build_run` assembles; lower and compile `step` under `jax.set_mesh(mesh)`."""
    mesh: Mesh
    rules: tuple
    model: EmbeddingModel
    optimizer: optax.GradientTransformation
    abstract_state: TrainState        # ShapeDtypeStructs: nothing allocated
    state_shardings: TrainState
    step: Callable                    # jitted (state, global batch, rng) -> (state, metrics), state donated
    example_batch: dict[str, Any]     # what traced the parameter init
    teacher_dim: int = 0              # > 0: params hold the student -> teacher map (embedding distillation)

    def init_state(self, rng: jax.Array) -> TrainState:
        """A fresh train state from `rng`, born sharded."""
        state, _ = create_train_state(self.model, self.optimizer, rng, self.mesh, self.rules, self.example_batch,
                                      shardings=self.state_shardings, teacher_dim=self.teacher_dim)
        return state


def build_run(config, devices: Sequence[Any] | None = None, num_slices: int | None = None) -> TrainAssembly:
    """Assembles the run of train `config` on `devices` (default: all), over `num_slices` slices
    (default: as many as the devices span; the `data` axis spans them)."""
    mesh = sharding.make_mesh(config.mesh, devices, num_slices)
    rules = sharding.logical_rules(config)
    model = EmbeddingModel(ModelConfig.from_dict(config.model.to_dict()))
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    # Parameters do not depend on the batch; one query-length row traces init. Outside set_mesh:
    # tracing init makes a concrete PRNG key, which cannot live on AOT-only devices.
    example = {"query_ids": (1, int(config.data.query_max_length))}
    teacher_dim = teacher_projection_dim(config)
    abstract_state, state_shardings = state_shardings_for(model, optimizer, mesh, rules, example, teacher_dim)
    step_fn = make_train_step(model, config.loss, optimizer, grad_cache_chunks=config.grad_cache_chunks,
                              frozen=config.optimizer.frozen)
    # The config's rules, not whatever is active at trace time, constrain activations.
    options = xla_cpu_flags.compiler_options(model.config.dtype, mesh.devices.flat[0].platform)
    step = jit_train_step(step_fn, state_shardings, mesh, rules=rules, compiler_options=options)
    return TrainAssembly(mesh, rules, model, optimizer, abstract_state, state_shardings, step, example, teacher_dim)
