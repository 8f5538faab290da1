"""What one ``ulr bench`` run depends on: seeds, methods, models, budgets and grids, with the
full, quick and smoke sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

from .methods import METHODS


@dataclass
class Settings:
    """Everything one bench run depends on (written to the JSON report).

    Attributes:
        seeds: model/data/noise seeds; every number is over all of them.
        methods: keys of :data:`METHODS` to run.
        quality_models: ``(model, dataset)`` pairs for gradient quality.
        quality_levels: forward rows per example to spend, per quality model.
        quality_batches: minibatches per seed and state.
        quality_warmup_steps: backprop Adam steps before the "trained" state (0: init only).
        tta: ``(dataset, model, budget_seconds)`` time-to-accuracy settings.
        lr_grid: Adam learning rates tried for every method.
        lr_extend: at most this many extra rates per method and setting, one ladder step
            beyond the grid's edge while the best rate is at the edge (see :func:`choose_lr`).
        eval_fractions: fractions of the budget at which the test accuracy is recorded.
        cost_steps: timed steps per estimator in the cost table.
        threads: torch intra-op threads.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    quality_models: tuple[tuple[str, str], ...] = (("mlp", "digits"), ("lenet5", "mnist-subset"))
    quality_levels: dict[str, tuple[int, ...]] = field(default_factory=lambda: {
        "mlp": (9, 33, 129, 513), "lenet5": (21, 81, 321)})
    quality_batches: int = 3
    quality_warmup_steps: int = 150
    tta: tuple[tuple[str, str, float], ...] = (
        ("digits", "mlp", 6.0), ("digits", "lenet5", 10.0),
        ("mnist-subset", "mlp", 12.0), ("mnist-subset", "lenet5", 20.0),
        ("fashion-mnist", "mlp", 20.0), ("fashion-mnist", "lenet5", 24.0))
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    lr_extend: int = 2
    eval_fractions: tuple[float, ...] = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
    cost_steps: int = 10
    threads: int = 1

    @classmethod
    def quick(cls) -> Settings:
        return cls(quality_levels={"mlp": (9, 33, 129), "lenet5": (21, 81)}, quality_batches=2,
                   quality_warmup_steps=100,
                   tta=(("digits", "mlp", 3.0), ("fashion-mnist", "mlp", 4.0),
                        ("digits", "lenet5", 4.0)),
                   lr_grid=(3e-3,), lr_extend=0, eval_fractions=(0.25, 0.5, 1.0),
                   cost_steps=5)

    @classmethod
    def smoke(cls) -> Settings:
        return cls(seeds=(0, 1), quality_models=(("mlp", "digits"),),
                   quality_levels={"mlp": (9,)}, quality_batches=1, quality_warmup_steps=2,
                   tta=(("digits", "mlp", 0.1),), lr_grid=(3e-3,), lr_extend=0,
                   eval_fractions=(0.5, 1.0),
                   cost_steps=1)

