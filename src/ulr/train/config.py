"""The run configuration of ``ulr train`` / :func:`ulr.train.fit`, and its TOML files.

One :class:`RunConfig` describes one training run completely: model, data, method, estimator,
optimiser, schedule, budget, seed and device. Every field is also a key of a config file and a
``--flag`` of ``ulr train`` (underscores become dashes); the field metadata below is the single
source of the help texts, the choices and the checks of both.

A config file is flat TOML; ``method`` may list several methods, each becoming one run, the
``[model_args]`` table passes extra keyword arguments to the model constructor,
``[method_args]`` (or ``[method_args.es]`` per method) those of a peer estimator and
``[site_sigma]`` the noise scale of the sites whose names match a pattern::

    model = "mlp"
    data = "digits"
    method = ["ulr", "bp", "es"]
    num_copies = 32
    sigma = 0.1
    lr = 3e-3

    [model_args]
    hidden = [256, 128]

    [method_args.es]
    population = 64

    [site_sigma]
    out = 0.05
    "hidden.*" = 0.2

Example:
    >>> from ulr.train.config import RunConfig, configs_from_values
    >>> [c.method for c in configs_from_values({"method": ["ulr", "bp"], "epochs": 2})]
    ['ulr', 'bp']
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "ConfigError",
    "RunConfig",
    "METHODS",
    "PEERS",
    "DEFAULT_LR",
    "GRADIENT_FREE",
    "LOSSES",
    "TABLES",
    "check_values",
    "reads",
    "configs_from_values",
    "field_help",
    "keys",
]

#: The peer estimators of :mod:`ulr.peers` that ``method`` accepts besides ``ulr`` and ``bp``.
PEERS = ("es", "spsa", "forward-gradient")
METHODS = ("ulr", "bp", "bp-noise", *PEERS)
#: The values of ``loss``: the task's own loss, or the classification error (0-1 loss).
LOSSES = ("auto", "zero-one")
#: The methods that need no gradient of the loss, and so train on the 0-1 loss.
GRADIENT_FREE = ("ulr", "es", "spsa")
#: Options that only the ULR estimator reads; bp-noise reads the first five (its noise).
NOISE_OPTIONS = ("noise", "sigma", "site_sigma", "sites", "recommended")
ULR_OPTIONS = (*NOISE_OPTIONS, "num_copies", "sampler", "baseline", "baseline_decay", "plan",
               "blocks", "memory", "chunk_size", "workers", "exchange")


def reads(method: str, key: str) -> bool:
    """Whether a run of ``method`` reads the option ``key`` (ULR options: ``ulr`` all of them,
    ``bp-noise`` its noise; every other key: every method)."""
    return key not in ULR_OPTIONS or method == "ulr" or (method == "bp-noise"
                                                          and key in NOISE_OPTIONS)


def check_options_used(keys: Iterable[str], methods: Sequence[str], source: str) -> None:
    """Refuse ULR options given for a run in which no method reads them (``--num-copies 64
    --method es`` would be recorded although ES ignores it)."""
    unused = [k for k in keys if not any(reads(m, k) for m in methods)]
    if unused:
        raise ConfigError(
            f"{source}: {', '.join(unused)} only change{'s' if len(unused) == 1 else ''} the "
            f"ULR estimator, but this run trains {', '.join(methods)}, which ignore"
            f"{'s' if len(methods) == 1 else ''} {'it' if len(unused) == 1 else 'them'}; drop "
            f"{'it' if len(unused) == 1 else 'them'}, add the ulr method, or set a peer's own "
            f"settings with --method-arg (e.g. es.population=64)")
#: Learning-rate schedules: stepped per epoch, and per optimizer step.
EPOCH_SCHEDULES = ("step", "cosine")
STEP_SCHEDULES = ("cosine-steps", "linear-steps")
SCHEDULES = ("none", *EPOCH_SCHEDULES, *STEP_SCHEDULES)
#: The fields that are tables (``[model_args]`` in a file, one ``KEY=VALUE`` per flag).
TABLES = ("model_args", "method_args", "site_sigma")
#: Learning rate of each method when ``lr`` is not set: the verified digits/MLP setting for ulr
#: and bp (and bp-noise), the peers' tuned rates on the MLP from docs/results/peers-report.md.
DEFAULT_LR = {"ulr": 3e-3, "bp": 1e-3, "bp-noise": 1e-3, "es": 3e-3, "spsa": 1e-3,
              "forward-gradient": 1e-3}


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key and the valid values."""


def _models() -> list[str]:
    from ..models import available

    return available()


def _datasets() -> list[str]:
    from ..data import available

    return available()


def _meta(
    group: str,
    help: str,
    *,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    check: Callable[[Any], bool] | None = None,
    rule: str = "",
    metavar: str | None = None,
    default_text: str | None = None,
) -> dict[str, Any]:
    return {"group": group, "help": help, "choices": choices, "check": check, "rule": rule,
            "metavar": metavar, "default_text": default_text}


def _positive(v: float) -> bool:
    return v > 0


def _at_least(n: int) -> Callable[[float], bool]:
    return lambda v: v >= n


def _is_device(v: str) -> bool:
    return v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None


def _fraction(v: float) -> bool:
    return 0 <= v < 1


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run (see the module docstring for the file format).

    ``None`` means "not set": ``lr`` then takes the method's default (:data:`DEFAULT_LR`),
    ``max_steps`` no limit, ``grad_clip`` no clipping, ``sites`` every module that owns a
    parameter, ``blocks`` every layer its own block (pure ULR; ``0`` is pure backprop).
    """

    # -- model and data -------------------------------------------------------------------------
    model: str = field(default="mlp", metadata=_meta(
        "model and data",
        "Network from the ulr.models registry (mlp is 64-128-10 on digits; the CNNs need "
        "square image data), or your own: MODULE:CALLABLE or path/to/file.py:CALLABLE, called "
        "with the --model-arg values and, if it names them, in_shape and num_outputs; it "
        "returns an nn.Module (docs/own-models.md).", choices=_models,
        metavar="NAME|MODULE:CALLABLE"))
    model_args: dict[str, Any] = field(default_factory=dict, metadata=_meta(
        "model and data",
        "Extra keyword argument of the model constructor, as KEY=VALUE with a TOML value, e.g. "
        "hidden=[256,128] or activation=\"tanh\"; repeat the flag for several. In a config "
        "file: a [model_args] table.", metavar="KEY=VALUE"))
    data: str = field(default="digits", metadata=_meta(
        "model and data",
        "Dataset from the ulr.data registry. digits is embedded (no download); adding is a "
        "regression task (MSE loss, reported as loss instead of accuracy). Or your own: "
        "MODULE:CALLABLE or path/to/file.py:CALLABLE returning a ulr.data.Dataset or "
        "{'train': (x, y), 'val': ..., 'test': ..., 'task': ...} (docs/own-models.md).",
        choices=_datasets, metavar="NAME|MODULE:CALLABLE"))
    data_dir: str | None = field(default=None, metadata=_meta(
        "model and data",
        "Directory of file-based datasets (fashion-mnist).", metavar="DIR",
        default_text="the loader's search path"))
    model_defaults: bool = field(default=True, metadata=_meta(
        "model and data",
        "Give the keys you do not set the model's own defaults, the best configuration "
        "measured for it (lenet5's: see the description above), before the generic ones; "
        "--no-model-defaults: the generic ones only."))
    val_fraction: float = field(default=0.1, metadata=_meta(
        "model and data",
        "Share of the non-test data held out for validation (model selection: 'best val').",
        check=_fraction, rule="in [0, 1)"))

    # -- method and estimator ------------------------------------------------------------------
    method: str = field(default="ulr", metadata=_meta(
        "method and estimator",
        "ulr: likelihood-ratio gradients from noisy forward passes only; bp: ordinary "
        "backpropagation; bp-noise: backpropagation through a forward pass with the ULR "
        "training noise (--noise, --sigma or --recommended, at the same --sites) added to "
        "every site, one draw per example and step (separates the effect of the noise from "
        "that of the estimator); es, spsa, forward-gradient: the peer estimators of ulr.peers "
        "(evolution strategies, SPSA/MeZO, forward gradient; options via --method-arg). "
        "Several methods train one after another from the same seed (same initial weights "
        "and data order) and are compared in a table.", choices=METHODS))
    method_args: dict[str, Any] = field(default_factory=dict, metadata=_meta(
        "method and estimator",
        "Keyword argument of a peer estimator, as KEY=VALUE with a TOML value: es takes "
        "sigma, population, antithetic; spsa eps, num_directions, perturbation; "
        "forward-gradient num_tangents. With several methods, prefix the method: "
        "es.population=64. In a config file: a [method_args] table (or [method_args.es]). "
        "ulr is set by its own options (--num-copies, --sigma, ...).", metavar="KEY=VALUE"))
    loss: str = field(default="auto", metadata=_meta(
        "method and estimator",
        "Training loss. auto: the task's (cross-entropy for classification, squared error for "
        "regression). zero-one: the classification error itself (1 where the argmax is "
        "wrong), whose gradient is zero wherever it exists: ulr, es and spsa train on it, "
        "backprop cannot. Only noise that flips the argmax carries signal, so give the "
        "output layer a wide noise scale of its own (e.g. --site-sigma out=2.0). The logged "
        "training loss is then the error of the noisy copies; validation and test report "
        "cross-entropy and accuracy as for every run.",
        choices=LOSSES))
    num_copies: int = field(default=32, metadata=_meta(
        "method and estimator",
        "Noise copies K per example and pass. Variance falls like 1/K and cost rises like K; "
        "raise it for wide layers or when the gradient cosine (--diag-every) is low. Even with "
        "the antithetic sampler.", check=_at_least(1), rule=">= 1"))
    noise: str = field(default="gaussian", metadata=_meta(
        "method and estimator",
        "Noise density at each site. laplace gives a 1-bit score (sign); logistic a bounded "
        "one.", choices=("gaussian", "laplace", "logistic")))
    sigma: float = field(default=0.1, metadata=_meta(
        "method and estimator",
        "Noise scale: the standard deviation for gaussian, the scale b / s for laplace / "
        "logistic. Smaller is less biased but noisier; the useful range is about 0.01-0.1.",
        check=_positive, rule="> 0"))
    site_sigma: dict[str, float] = field(default_factory=dict, metadata=_meta(
        "method and estimator",
        "Noise scale of the sites whose name matches PATTERN (fnmatch, e.g. out or 'hidden.*'), "
        "as PATTERN=SIGMA; repeat the flag for several (the first matching pattern wins, the "
        "other sites take --sigma or --recommended's). In a config file: a [site_sigma] "
        "table. Used by ulr and bp-noise.", metavar="PATTERN=SIGMA"))
    sampler: str = field(default="iid", metadata=_meta(
        "method and estimator",
        "How the K copies are drawn: iid is plain Monte Carlo (the default: with a baseline it "
        "matches or beats antithetic, see docs/results/variance.md); antithetic pairs (z, -z) "
        "cancel the zeroth-order term (far lower variance without a baseline); sobol is "
        "randomised quasi-Monte Carlo (not with leave-one-out); antithetic-sobol combines both.",
        choices=("antithetic", "iid", "sobol", "antithetic-sobol")))
    baseline: str = field(default="leave-one-out", metadata=_meta(
        "method and estimator",
        "Control variate subtracted from each copy's loss: leave-one-out (mean of the other "
        "copies, free), clean (noise-free loss, one extra forward of B rows), running-average "
        "(moving average over steps), none.",
        choices=("leave-one-out", "clean", "running-average", "none")))
    baseline_decay: float = field(default=0.9, metadata=_meta(
        "method and estimator", "Decay of the running-average baseline.",
        check=_fraction, rule="in [0, 1)"))
    plan: str = field(default="layerwise", metadata=_meta(
        "method and estimator",
        "layerwise: one perturbed pass per layer (less variance per layer, L passes); "
        "all-sites: one pass with noise everywhere (cheapest, noisier).",
        choices=("layerwise", "all-sites")))
    sites: list[str] | None = field(default=None, metadata=_meta(
        "method and estimator",
        "Module names (wildcards allowed) whose outputs get noise; default: every module that "
        "owns a parameter (pure ULR). Naming only block outputs gives backprop inside blocks.",
        metavar="NAME", default_text="every module that owns a parameter"))
    blocks: int | None = field(default=None, metadata=_meta(
        "method and estimator",
        "Hybrid BP/LR in one knob: split the model's parameterised layers into N equal blocks "
        "of consecutive layers with a noise site only at each block's end, so backprop runs "
        "inside each block and the LR signal connects the blocks (ulr.hybrid.blocks). N = the "
        "number of layers is pure ULR (the default), 0 is pure backprop (no sites). Not with "
        "--sites; ignored by --method bp.", check=_at_least(0), rule=">= 0",
        metavar="N", default_text="every layer its own block (pure ULR)"))
    recommended: bool = field(default=False, metadata=_meta(
        "method and estimator",
        "Use the model's recommended per-layer sigma (weight noise on the first convs of "
        "resnet5/vgg8) and (with the layerwise plan) per-layer copy counts instead of "
        "--sigma/--num-copies."))
    memory: str = field(default="store", metadata=_meta(
        "method and estimator",
        "What the estimator keeps until the losses are known: store (every site's input and "
        "noise, fastest), chunked (copies in chunks of --chunk-size, memory bounded by a "
        "chunk), replay (losses first, then the noise regenerated site by site: memory close "
        "to inference, two forwards). All give the same estimate.",
        choices=("store", "chunked", "replay")))
    chunk_size: int | None = field(default=None, metadata=_meta(
        "method and estimator", "Copies per chunk with --memory chunked.",
        check=_at_least(1), rule=">= 1", default_text="none"))

    workers: int = field(default=0, metadata=_meta(
        "method and estimator",
        "Threads that assemble the per-site gradients once a pass's losses are known, "
        "overlapping the next pass's forward (CUDA: one stream each). Same gradients, bit for "
        "bit; whether it is faster depends on free cores (docs/rearrangement.md). 0: in the "
        "training thread. Not with --memory replay.", check=_at_least(0), rule=">= 0"))

    # -- optimisation ----------------------------------------------------------------------------
    optimizer: str = field(default="adam", metadata=_meta(
        "optimisation", "torch.optim optimizer fed with the estimated gradients.",
        choices=("adam", "adamw", "sgd")))
    lr: float | None = field(default=None, metadata=_meta(
        "optimisation", "Learning rate (the defaults suit Adam on digits).",
        check=_positive, rule="> 0",
        default_text="3e-3 for ulr and es, 1e-3 for bp, bp-noise, spsa and forward-gradient"))
    momentum: float = field(default=0.9, metadata=_meta(
        "optimisation", "SGD momentum (sgd only).", check=_at_least(0), rule=">= 0"))
    weight_decay: float = field(default=0.0, metadata=_meta(
        "optimisation",
        "Weight decay (decoupled for adamw, which equals adam without it; try 0.01).",
        check=_at_least(0), rule=">= 0"))
    schedule: str = field(default="none", metadata=_meta(
        "optimisation",
        "Learning-rate schedule. Per epoch: step multiplies by --gamma every --step-size "
        "epochs; cosine anneals to 0 over --epochs. Per optimizer step: cosine-steps and "
        "linear-steps decay to 0 over the run's steps (epochs x steps per epoch), after "
        "--warmup-steps.", choices=SCHEDULES))
    warmup_steps: int = field(default=0, metadata=_meta(
        "optimisation",
        "Raise the learning rate linearly from 0 to --lr over the first N optimizer steps "
        "(with --schedule none, cosine-steps or linear-steps).", check=_at_least(0),
        rule=">= 0", metavar="N", default_text="0, off"))
    step_size: int = field(default=10, metadata=_meta(
        "optimisation", "Epochs between decays of the step schedule.",
        check=_at_least(1), rule=">= 1"))
    gamma: float = field(default=0.1, metadata=_meta(
        "optimisation", "Decay factor of the step schedule.", check=_positive, rule="> 0"))
    grad_clip: float | None = field(default=None, metadata=_meta(
        "optimisation", "Clip the global gradient norm to this value.",
        check=_positive, rule="> 0", default_text="no clipping"))
    batch_size: int = field(default=32, metadata=_meta(
        "optimisation", "Training examples per step (each ULR pass runs K times as many rows).",
        check=_at_least(1), rule=">= 1"))
    epochs: int = field(default=30, metadata=_meta(
        "optimisation", "Passes over the training set.", check=_at_least(1), rule=">= 1"))
    early_stop: int = field(default=0, metadata=_meta(
        "optimisation",
        "Stop when the validation score (accuracy; loss for regression) has not improved for "
        "this many epochs; best.pt keeps the best epoch's weights. 0: off.",
        check=_at_least(0), rule=">= 0", metavar="PATIENCE", default_text="0, off"))
    max_steps: int | None = field(default=None, metadata=_meta(
        "optimisation",
        "Stop after this many optimizer steps in total (smoke tests); the run still evaluates "
        "and writes a resumable checkpoint. 0: no limit (lifts an earlier limit on --resume).",
        check=_at_least(0), rule=">= 0 (0: no limit)", default_text="no limit"))

    # -- run -------------------------------------------------------------------------------------
    seed: int = field(default=0, metadata=_meta(
        "run",
        "Seeds the train/val split, the initial weights, the data order and the noise (each "
        "from its own stream); the same seed and config give identical metrics.",
        check=_at_least(0), rule=">= 0"))
    device: str = field(default="auto", metadata=_meta(
        "run", "cpu, cuda, cuda:N (GPU N), or auto (cuda when available).",
        check=_is_device, rule="auto, cpu, cuda or cuda:N", metavar="DEVICE"))
    threads: int = field(default=1, metadata=_meta(
        "run",
        "CPU threads of the run (torch.set_num_threads, restored afterwards); 0 keeps torch's "
        "default (all cores). One thread is fastest for the small reference models and robust "
        "on shared machines, where multi-threaded runs can slow down many times over; raise "
        "it for the CNNs on a dedicated machine. Results are bit-identical only for the same "
        "thread count.", check=_at_least(0), rule=">= 0"))
    eval_batch_size: int = field(default=1024, metadata=_meta(
        "run", "Examples per evaluation batch (memory only; results do not depend on it).",
        check=_at_least(1), rule=">= 1"))
    exchange: str = field(default="grads", metadata=_meta(
        "run",
        "What the processes of a multi-process ULR run (torchrun, --nproc) exchange to finish "
        "each gradient: grads all-reduces the partial gradients (|theta| numbers per step); "
        "losses sends only the per-row losses (K*B numbers per pass) and every rank rebuilds "
        "the gradient by regenerating the other ranks' noise: cheap with the layerwise plan "
        "(see docs/distributed.md). Same estimate either way; ignored in one process.",
        choices=("grads", "losses")))
    log_every: int | None = field(default=None, metadata=_meta(
        "run",
        "Print a progress line (step, loss, accuracy, samples/s, ETA) every N steps; 0 never.",
        check=_at_least(0), rule=">= 0",
        default_text="every 60 s while no progress bar shows, i.e. off a terminal"))
    checkpoint_every: int | None = field(default=None, metadata=_meta(
        "run",
        "Also checkpoint inside an epoch every N steps (Ctrl-C, SIGTERM or a crash then lose "
        "at most N steps; --resume continues bit-exactly); 0: at epoch ends only.",
        check=_at_least(0), rule=">= 0", default_text="every 10 minutes of training"))
    tensorboard: bool = field(default=False, metadata=_meta(
        "run",
        "Also write the step and epoch scalars as TensorBoard events to RUN_DIR/tensorboard "
        "(needs the tensorboard package: pip install 'ulr[integrations]')."))
    diag_every: int = field(default=0, metadata=_meta(
        "run",
        "Every N steps, log the per-layer cosine and norm ratio of the ULR gradient against "
        "the backprop gradient of the same batch (one extra forward+backward; training is "
        "unaffected).", check=_at_least(0), rule=">= 0", default_text="0, off"))

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _check(f.name, getattr(self, f.name), "RunConfig"))
        if self.max_steps == 0:  # 0 spells "no limit" where None cannot be written
            object.__setattr__(self, "max_steps", None)
        object.__setattr__(self, "method_args", _own_method_args(self.method, self.method_args))
        if self.loss == "zero-one":
            pure_bp = self.method == "ulr" and self.blocks == 0
            if self.method not in GRADIENT_FREE or pure_bp:
                what = "blocks=0 (pure backprop)" if pure_bp else f"method {self.method!r}"
                raise ConfigError(
                    f"loss 'zero-one' with {what}: the 0-1 loss has zero gradient wherever it "
                    f"has one, so backprop cannot train on it; use a gradient-free method "
                    f"({', '.join(GRADIENT_FREE)}), or loss 'auto' (the task's differentiable "
                    f"loss) for a backprop reference")
            if self.diag_every:
                raise ConfigError(
                    "diag_every compares the ULR gradient with backprop's gradient of the "
                    "loss, which is zero for loss 'zero-one'; set diag_every=0 (or loss 'auto')")
        if self.warmup_steps and self.schedule in EPOCH_SCHEDULES:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} works per optimizer step, schedule "
                f"{self.schedule!r} per epoch; use schedule 'cosine-steps', 'linear-steps' or "
                f"'none' with a warmup")
        if self.method == "ulr" and self.blocks is not None and self.sites is not None:
            raise ConfigError(
                f"blocks={self.blocks} and sites={self.sites} both choose the noise sites; "
                f"give one of them (blocks: N equal blocks; sites: the block ends by name)")
        if self.method == "ulr":
            from .recipes import check_estimator

            check_estimator(self)

    @property
    def resolved_lr(self) -> float:
        """``lr``, or the method's default learning rate when it is not set."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR["bp" if self.blocks == 0 else self.method]

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-able dict of every field (``None`` for unset fields)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> RunConfig:
        """Build from a dict such as :meth:`to_dict` returns; unknown keys are an error."""
        _check_keys(values, source)
        values = {_key(k): v for k, v in values.items()}
        if isinstance(values.get("method"), list):
            raise ConfigError(f"{source}: a single run needs one method, got {values['method']}")
        return cls(**{k: _check(k, v, source) for k, v in values.items()})


_FIELDS = {f.name: f for f in fields(RunConfig)}
# each field's type, from its annotation ("int | None" -> int, "dict[str, Any]" -> dict)
_TYPES: dict[str, type] = {
    f.name: {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}[
        str(f.type).split(" |")[0].split("[")[0]] for f in fields(RunConfig)}
_OPTIONAL = {n for n, f in _FIELDS.items() if f.default is None}


def keys() -> list[str]:
    """The keys a config file accepts, in field order."""
    return list(_FIELDS)


def field_help(name: str) -> dict[str, Any]:
    """Metadata of one field: group, help, choices (resolved), rule, metavar, default_text,
    default, type."""
    f = _FIELDS[name]
    meta = dict(f.metadata)
    if callable(meta["choices"]):
        meta["choices"] = list(meta["choices"]())
    meta["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    meta["type"] = _TYPES[name]
    return meta


def _key(key: str) -> str:
    return key.replace("-", "_")


def _check_keys(values: Mapping[str, Any], source: str) -> None:
    for raw in values:
        if _key(raw) not in _FIELDS:
            close = difflib.get_close_matches(_key(raw), list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key {raw!r}{hint}; valid keys: {', '.join(_FIELDS)}"
            )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check(name: str, value: Any, source: str) -> Any:
    """Validate and normalise one value (``method`` lists are handled by the caller)."""
    meta = _FIELDS[name].metadata
    kind = _TYPES[name]
    where = f"{source}: {name}"
    if value is None:
        if name in _OPTIONAL:
            return None
        raise ConfigError(f"{where} may not be empty")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value!r}")
    if name in ("model", "data") and ":" in value:  # the user's callable, not the registry's
        from .custom import normalise_spec

        try:
            return normalise_spec(value, name)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    choices = meta["choices"]
    if choices is not None:
        valid = list(choices() if callable(choices) else choices)
        norm = value.strip().lower().replace("_", "-")
        if norm not in valid:
            close = difflib.get_close_matches(norm, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            own = (" (or your own: MODULE:CALLABLE, path/to/file.py:CALLABLE)"
                   if name in ("model", "data") else "")
            raise ConfigError(f"{where}: unknown value {value!r}{hint}; valid: "
                              f"{', '.join(valid)}{own}")
        value = norm
    if meta["check"] is not None and not meta["check"](value):
        raise ConfigError(f"{where} must be {meta['rule']}, got {value!r}")
    if name == "sites" and not (value and all(isinstance(s, str) and s for s in value)):
        raise ConfigError(f"{where} must be a non-empty list of module names, got {value!r}")
    if name == "model_args":
        bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ConfigError(f"{where}: keys must be argument names, got {bad}")
        value = {k: _plain(v) for k, v in value.items()}
    if name == "method_args":
        value = _check_method_args(value, where)
    if name == "site_sigma":
        value = _check_site_sigma(value, where)
    return value


def _check_site_sigma(value: dict[str, Any], where: str) -> dict[str, float]:
    """``{pattern: sigma}``: non-empty patterns, finite positive numbers (ints become floats)."""
    out: dict[str, float] = {}
    for pattern, sigma in value.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"{where}: keys must be module name patterns, got {pattern!r}")
        if (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                or not math.isfinite(sigma) or sigma <= 0):
            raise ConfigError(f"{where}[{pattern!r}] must be a number > 0 (the noise scale of "
                              f"the matching sites), got {sigma!r}")
        out[pattern.strip()] = float(sigma)
    return out


def _peer_arguments(method: str) -> list[str]:
    """The keyword arguments ``method_args`` may set for the peer ``method``."""

    from .. import peers

    return [p for p in peers.arguments(method) if p not in ("generator", "exclude")]


def _check_method_args(value: dict[str, Any], where: str, table: bool = False
                       ) -> dict[str, Any]:
    """Flat ``{argument: value}`` plus optional ``{peer: {argument: value}}`` tables; keys
    normalised (a peer's name with dashes, arguments with underscores) and checked."""
    out: dict[str, Any] = {}
    for raw, v in value.items():
        key = str(raw).strip().lower().replace("_", "-")
        if isinstance(v, dict):
            if table:
                raise ConfigError(f"{where}: [{raw}] inside a method's table; method_args "
                                  f"tables nest one level only ([method_args.es])")
            if key not in PEERS:
                raise ConfigError(
                    f"{where}: [{raw}] is not a peer estimator; per-method tables are for "
                    f"{', '.join(PEERS)} (ulr and bp are set by their own options)")
            out[key] = {**out.get(key, {}),
                        **_check_method_args(v, f"{where}.{key}", table=True)}
            continue
        arg = str(raw).strip().replace("-", "_")
        if not arg.isidentifier():
            raise ConfigError(f"{where}: keys must be argument names, got {raw!r}")
        out[arg] = _plain(v)
    return out


def _own_method_args(method: str, value: dict[str, Any]) -> dict[str, Any]:
    """The flat arguments of ``method`` from flat keys and its own table; anything that does
    not fit it is an error naming the arguments it takes."""
    tables = {k: v for k, v in value.items() if isinstance(v, dict)}
    flat = {k: v for k, v in value.items() if not isinstance(v, dict)}
    other = sorted(set(tables) - {method})
    if other:
        raise ConfigError(f"method_args has a table for {other} but the method is {method!r}")
    args = {**flat, **tables.get(method, {})}
    if not args:
        return {}
    if method not in PEERS:
        raise ConfigError(
            f"method_args {sorted(args)} given for method {method!r}: they configure the "
            f"peer estimators ({', '.join(PEERS)}); {method} is set by its own options"
            + (" (--num-copies, --sigma, --sampler, ...)" if method == "ulr" else ""))
    valid = _peer_arguments(method)
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ConfigError(f"method_args: {method} takes no argument {unknown}; it takes "
                          f"{', '.join(valid)}")
    return args


def check_values(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate a partial mapping of config values (a file, or command-line overrides).

    ``method`` may be a string or a list of methods. Keys may use dashes or underscores.

    Returns:
        The values with snake_case keys, normalised choices (lower case, dashes) and floats.

    Raises:
        ConfigError: an unknown key (the message lists the valid ones) or an invalid value.
    """
    _check_keys(values, source)
    out: dict[str, Any] = {}
    for raw, value in values.items():
        key = _key(raw)
        if key == "method" and isinstance(value, (list, tuple)):
            if not value:
                raise ConfigError(f"{source}: method needs at least one of {', '.join(METHODS)}")
            methods = [_check("method", m, source) for m in value]
            dup = sorted({m for m in methods if methods.count(m) > 1})
            if dup:
                raise ConfigError(f"{source}: method lists {dup} more than once")
            out[key] = methods
        else:
            out[key] = _check(key, value, source)
    return out


def configs_from_values(values: Mapping[str, Any], source: str = "config") -> list[RunConfig]:
    """One :class:`RunConfig` per method from a mapping of (partial) config values.

    Args:
        values: keys of :class:`RunConfig`; ``method`` may be a list; missing keys take the
            model's own defaults (:data:`ulr.train.recipes.MODEL_DEFAULTS`), then the fields'.
        source: where the values come from, for error messages.

    Returns:
        The runs, in the order of ``method``.
    """
    values = check_values(values, source)
    methods = values.pop("method", RunConfig.method)
    if isinstance(methods, str):
        methods = [methods]
    method_args = values.pop("method_args", {})
    tables = {k for k, v in method_args.items() if isinstance(v, dict)}
    if tables - set(methods):
        raise ConfigError(f"{source}: method_args has a table for "
                          f"{sorted(tables - set(methods))} but the methods are {methods}")
    flat = {k: v for k, v in method_args.items() if not isinstance(v, dict)}
    # Flat arguments go to the peers of the list (to every run when it names none, which
    # then reports them as misplaced).
    takers = [m for m in methods if m in PEERS] or methods

    def own(m: str) -> dict[str, Any]:
        return {**(flat if m in takers else {}),
                **({m: method_args[m]} if m in tables else {})}

    from .recipes import model_defaults

    configs = []
    for m in methods:
        defaults = (model_defaults(values.get("model", RunConfig.model), m, values)
                    if values.get("model_defaults", True) else {})
        try:
            configs.append(RunConfig(**{**defaults, **values}, method=m, method_args=own(m)))
        except ConfigError as e:
            own_values = (f" ({values.get('model')}'s own defaults set "
                          f"{', '.join(f'{k}={v!r}' for k, v in defaults.items())}; a value you "
                          f"give replaces one)" if defaults else "")
            raise ConfigError(f"{source}: {e}{own_values}") from None
    return configs
