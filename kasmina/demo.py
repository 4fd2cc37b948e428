"""``kasmina demo``: grow a too-narrow MLP on scikit-learn's digits.

The host is ``Linear(64, H) → ReLU → Linear(H, 10)`` with a small ``H``; its hidden
layer is a :class:`~kasmina.ChunkedKasminaLayer` with one seed per chunk. A
:class:`~kasmina.SeedController` germinates seeds when validation loss plateaus and
takes them through the lifecycle; a :class:`~kasmina.LifecyclePolicy` scales the spec's
minimum epochs to the run's length (:func:`~kasmina.controller.scaled_policy`); every
guard threshold is the spec's. The same host, with the same initial weights and batches
but no seeds, is trained for the same epochs and both are scored on the test split.

Outputs under ``<out>/<name>/``: ``config.json``, ``telemetry.jsonl`` (one line per
epoch), ``lifecycle.png``, ``summary.json`` and ``checkpoints/`` (one whole-layer
checkpoint per epoch holding everything needed to resume: the layer, the rest of the
model, the optimizer, the controller and the RNG). ``--resume`` continues from the
newest checkpoint that verifies, and finishes in the same state as an uninterrupted run.
With ``--tensorboard`` the same metrics also go to ``<run>/tensorboard``.

Blueprint parameters join the optimizer (Adam) through ``layer.sync_optimizer`` in
their own groups with ``blueprint_lr`` (1e-2, the host uses 3e-3): a seed must learn its
reconstruction within its TRAINING budget. The run uses one CPU thread (see
:func:`run_demo`), so it is bit-reproducible on CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._generated.lifecycle_tables import StateColumn
from .blueprints import BlueprintRegistry, LowRankBlueprint, MLPBlueprint, ResidualLinearBlueprint
from .checkpoint import CheckpointManager, CheckpointRecovery
from .checkpoint_errors import CheckpointNotFoundError
from .controller import ControllerConfig, SeedController, SeedLife, ablate_chunks, scaled_policy
from .layer import ChunkedKasminaLayer
from .telemetry import ExtendedTelemetry, JsonlWriter, TensorBoardWriter, tensorboard_available

__all__ = ["DemoConfig", "DemoError", "DemoResult", "run_demo"]

LAYER_ID = "hidden"
_CONFIG_FILE = "config.json"


class DemoError(Exception):
    """A problem with the user's demo request (bad option, nothing to resume)."""


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (``None`` epochs/seeds take the defaults)."""

    epochs: int | None = None
    seeds: int | None = None
    device: str = "cpu"
    seed: int = 0
    out: Path = Path("runs")
    name: str | None = None
    hidden: int = 8
    blueprint_hidden_ratio: float = 4.0
    batch_size: int = 64
    lr: float = 3e-3
    blueprint_lr: float = 1e-2
    policy_fraction: float = 0.3
    tensorboard: bool = False
    controller: ControllerConfig = field(default_factory=lambda: ControllerConfig(plateau_patience=4, max_active=2))

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", 120 if self.epochs is None else self.epochs)
        object.__setattr__(self, "seeds", 4 if self.seeds is None else self.seeds)
        object.__setattr__(self, "out", Path(self.out))
        if self.epochs < 1:
            raise DemoError(f"--epochs must be at least 1, got {self.epochs}")
        if not 1 <= self.seeds <= self.hidden:
            raise DemoError(f"--seeds must be between 1 and the hidden width {self.hidden}, got {self.seeds}")
        if self.name is None:  # a fresh folder: digits-e120-s4-r0, then -2, -3, ...
            base = f"digits-e{self.epochs}-s{self.seeds}-r{self.seed}"
            name, n = base, 1
            while (self.out / name).exists() and any((self.out / name).iterdir()):
                n += 1
                name = f"{base}-{n}"
            object.__setattr__(self, "name", name)
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise DemoError(f"--name must be a plain folder name, got {self.name!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise DemoError(f"--device {self.device!r} is not a torch device ({exc})") from None
        if device.type not in ("cpu", "cuda"):
            raise DemoError(f"--device {self.device}: the demo trains on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DemoError(f"--device {self.device}: no CUDA device is available")

    @property
    def run_dir(self) -> Path:
        return self.out / str(self.name)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["controller"]["blueprints"] = list(self.controller.blueprints)
        return data

    @classmethod
    def for_resume(cls, run_dir: Path, device: str | None = None) -> DemoConfig:
        """The configuration a run in ``run_dir`` was started with."""
        path = Path(run_dir) / _CONFIG_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DemoError(f"--resume {run_dir}: no {_CONFIG_FILE} there (is it a demo run folder?)") from None
        except (OSError, ValueError) as exc:
            raise DemoError(f"--resume {run_dir}: cannot read {path} ({exc})") from None
        data["controller"] = ControllerConfig(**{**data["controller"], "blueprints": tuple(data["controller"]["blueprints"])})
        data["out"] = Path(run_dir).parent
        data["name"] = Path(run_dir).name
        config = cls(**data)
        return config if device is None else replace(config, device=device)


@dataclass
class DemoResult:
    """What a demo run produced."""

    completed: bool
    run_dir: Path
    epochs: int
    test_accuracy: float
    baseline_test_accuracy: float
    test_loss: float
    baseline_test_loss: float
    lives: list[SeedLife]
    final_states: dict[str, int]
    seconds: float
    resumed_from_epoch: int | None = None


# ---- data and model ----------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    x: Tensor
    y: Tensor


def load_digits_split(device: torch.device) -> tuple[Split, Split, Split]:
    """scikit-learn's 8×8 digits, features scaled to [0, 1], split 60/20/20 (stratified,
    fixed: the split never depends on ``--seed``)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.25, random_state=0, stratify=y_rest)

    def split(a: Any, b: Any) -> Split:
        return Split(torch.tensor(a, device=device), torch.tensor(b, dtype=torch.long, device=device))

    return split(x_train, y_train), split(x_val, y_val), split(x_test, y_test)


class DigitsMLP(nn.Module):
    """``hidden(x) → ReLU → Linear(H, 10)``; ``hidden`` is a Linear or a seeded layer."""

    def __init__(self, hidden: nn.Module, width: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.hidden(x)))


def build_models(config: DemoConfig, policy: Any) -> tuple[DigitsMLP, DigitsMLP]:
    """(grown, baseline): identical initial weights; the grown one's hidden layer has seeds."""
    torch.manual_seed(config.seed)
    baseline = DigitsMLP(nn.Linear(64, config.hidden), config.hidden)
    torch.manual_seed(config.seed)
    host = nn.Linear(64, config.hidden)
    registry = BlueprintRegistry(
        {1: MLPBlueprint(hidden_ratio=config.blueprint_hidden_ratio), 2: LowRankBlueprint(), 3: ResidualLinearBlueprint()}
    )
    layer = ChunkedKasminaLayer(host, int(config.seeds), layer_id=LAYER_ID, blueprints=registry, policy=policy)
    grown = DigitsMLP(layer, config.hidden)
    grown.head.load_state_dict(baseline.head.state_dict())
    device = torch.device(config.device)
    return grown.to(device), baseline.to(device)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, device: torch.device) -> list[Tensor]:
    """The epoch's shuffled mini-batches of row indices: a function of (seed, epoch) only,
    so the grown model, the baseline and every rank see the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(n, generator=generator).to(device).split(batch_size))


def train_epoch(
    model: DigitsMLP, optimizer: torch.optim.Optimizer, data: Split, config: DemoConfig, epoch: int
) -> tuple[float, float]:
    """One pass over the training split; returns (mean task loss, accuracy)."""
    model.train()
    layer = model.hidden if isinstance(model.hidden, ChunkedKasminaLayer) else None
    total_loss = torch.zeros((), device=data.x.device)
    correct = torch.zeros((), dtype=torch.long, device=data.x.device)
    for idx in batch_indices(len(data.y), config.batch_size, config.seed, epoch, data.x.device):
        logits = model(data.x[idx])
        loss = F.cross_entropy(logits, data.y[idx])
        objective = loss + layer.auxiliary_loss() if layer is not None else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(1) == data.y[idx]).sum()
    n = len(data.y)
    return float(total_loss) / n, float(correct) / n


@torch.no_grad()
def evaluate(model: DigitsMLP, data: Split) -> tuple[float, float, Tensor]:
    """(loss, accuracy, predictions) on a split."""
    model.eval()
    logits = model(data.x)
    predictions = logits.argmax(1)
    return float(F.cross_entropy(logits, data.y)), float((predictions == data.y).float().mean()), predictions


def ablation_losses(model: DigitsMLP, data: Split):  # type: ignore[no-untyped-def]
    """``ablate(seed_ids) -> (K,)`` validation losses with each seed's chunk replaced by the
    host output, in one batched forward of the head."""

    @torch.no_grad()
    def ablate(seed_ids: Tensor) -> Tensor:
        model.eval()
        layer: ChunkedKasminaLayer = model.hidden  # type: ignore[assignment]
        hidden = layer(data.x)
        copies = ablate_chunks(layer, hidden, layer.base_layer(data.x), seed_ids)  # (K, N, H)
        logits = model.head(F.relu(copies))
        k = copies.shape[0]
        losses = F.cross_entropy(logits.reshape(-1, 10), data.y.repeat(k), reduction="none")
        return losses.view(k, -1).mean(1)

    return ablate


# ---- checkpoints -------------------------------------------------------------------------
def _optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    groups = []
    for group in optimizer.param_groups:
        options = {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str, type(None)))}
        options["betas"] = list(group["betas"])
        groups.append({"params": [names[id(p)] for p in group["params"]], "options": options})
    state = {names[id(p)]: dict(s) for p, s in optimizer.state.items() if id(p) in names}
    return {"groups": groups, "state": state}


def _restore_optimizer(saved: dict[str, Any], params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    groups = []
    for group in saved["groups"]:
        options = dict(group["options"])
        options["betas"] = tuple(options["betas"])
        groups.append({"params": [params[name] for name in group["params"]], **options})
    optimizer = torch.optim.Adam(groups)
    for name, state in saved["state"].items():
        optimizer.state[params[name]] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
    return optimizer


def save_run_checkpoint(
    manager: CheckpointManager, model: DigitsMLP, optimizer: torch.optim.Optimizer, controller: SeedController, epoch: int
) -> str:
    """One whole-layer checkpoint holding everything needed to continue the run."""
    layer: ChunkedKasminaLayer = model.hidden  # type: ignore[assignment]
    layer_tensors = layer.state_dict()
    blueprints = {k: v for k, v in layer_tensors.items() if k.startswith("seed_blueprints.")}
    rest = {k: v for k, v in layer_tensors.items() if not k.startswith(("seed_blueprints.", "state."))}
    names = {id(p): n for n, p in model.named_parameters()}
    metadata = {
        "epoch": epoch,
        "layer": rest,
        "head": model.head.state_dict(),
        "optimizer": _optimizer_state(optimizer, names),
        "controller": controller.state_dict(),
        "rng": torch.get_rng_state(),
    }
    return manager.save_layer_state(LAYER_ID, layer.state, blueprints, metadata=metadata)


def load_run_checkpoint(
    manager: CheckpointManager, model: DigitsMLP, controller: SeedController
) -> tuple[int, torch.optim.Optimizer, str, int]:
    """Restore the newest checkpoint that verifies; returns (epoch, optimizer, id, skipped)."""
    try:
        found = CheckpointRecovery(manager).recover_layer_state(LAYER_ID)
    except CheckpointNotFoundError as exc:
        raise DemoError(f"--resume: {exc}") from None
    checkpoint = found.checkpoint
    meta = checkpoint["metadata"]
    layer: ChunkedKasminaLayer = model.hidden  # type: ignore[assignment]
    device = layer.alpha.device
    tensors = {**meta["layer"], **checkpoint["blueprints"], **{f"state.{k}": v for k, v in checkpoint["state"].items()}}
    layer.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    model.head.load_state_dict({k: v.to(device) for k, v in meta["head"].items()})
    layer.new_parameters()  # the restored blueprints are handed to the optimizer below
    params = dict(model.named_parameters())
    optimizer = _restore_optimizer(_to(meta["optimizer"], device), params)
    layer.sync_optimizer(optimizer)
    controller.load_state_dict(meta["controller"])
    torch.set_rng_state(meta["rng"].to(torch.uint8).clone())  # a fresh tensor: the loaded one views the payload
    return int(meta["epoch"]), optimizer, found.checkpoint_id, len(found.skipped)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


# ---- the run -----------------------------------------------------------------------------
def train_baseline(model: DigitsMLP, data: Split, config: DemoConfig) -> None:
    """Train the seedless baseline for the run's epochs on the same batches."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    for epoch in range(int(config.epochs)):
        train_epoch(model, optimizer, data, config, epoch)


def epoch_record(epoch: int, train: tuple[float, float], val: tuple[float, float], controller: SeedController,
                 layer: ChunkedKasminaLayer, telemetry: ExtendedTelemetry, decisions: list) -> dict[str, Any]:  # fmt: skip
    """One epoch's telemetry line: losses, seed states, alphas, the controller's decisions."""
    return {
        "epoch": epoch,
        "train_loss": train[0],
        "train_accuracy": train[1],
        "val_loss": val[0],
        "val_accuracy": val[1],
        "stability": controller.stability,
        "seed_states": layer.state.state[:, StateColumn.LIFECYCLE_STATE].tolist(),
        "alpha": layer.get_alpha().tolist(),
        "performance_delta": controller.delta.tolist(),
        "reconstruction_loss": layer.reconstruction_loss.tolist(),
        "decisions": [asdict(d) for d in decisions if d.accepted],
        "refused": sum(1 for d in decisions if not d.accepted),
        "lifecycle": telemetry.collect_lifecycle_metrics(epoch),
    }


_ANNOUNCED = ("GERMINATED", "FOSSILIZED", "CULLED", "ROLLED_BACK", "CANCELLED")


@dataclass
class RunLog:
    """A run's outputs, shared by :func:`run_demo` and rank 0 of
    :mod:`kasmina.demo_distributed`: per epoch a telemetry line (and TensorBoard
    scalars), a checkpoint and the progress bar; at the end the baseline comparison, the
    picture, the printed report and ``summary.json``. ``extra`` fields are added to every
    telemetry line and to the summary."""

    model: DigitsMLP
    controller: SeedController
    manager: CheckpointManager
    telemetry: ExtendedTelemetry
    writer: JsonlWriter
    bar: Any  # tqdm
    records: list[dict[str, Any]] = field(default_factory=list)
    board: TensorBoardWriter | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def epoch(self, epoch: int, train: tuple[float, float], val: tuple[float, float],
              optimizer: torch.optim.Optimizer, decisions: list) -> None:  # fmt: skip
        """Record a finished epoch, checkpoint the run and show the accepted lifecycle moves."""
        layer: ChunkedKasminaLayer = self.model.hidden  # type: ignore[assignment]
        record = epoch_record(epoch, train, val, self.controller, layer, self.telemetry, decisions) | self.extra
        self.writer.write(record)
        self.records.append(record)
        if self.board is not None:
            self.board.write({k: record[k] for k in ("train_loss", "val_loss", "val_accuracy", "lifecycle")}, step=epoch)
        save_run_checkpoint(self.manager, self.model, optimizer, self.controller, epoch)
        self.bar.set_postfix_str(f"loss {val[0]:.3f} acc {val[1]:.3f} | {state_counts(layer)}", refresh=False)
        for d in decisions:
            if d.accepted and d.to_state in _ANNOUNCED:
                self.bar.write(f"  epoch {epoch:3d}: seed {d.seed} {d.from_state} -> {d.to_state} ({d.why})")

    def finish(self, config: DemoConfig, baseline: DigitsMLP, train: Split, test: Split, started: float,
               resumed_from: int | None = None) -> DemoResult:  # fmt: skip
        """Train the baseline, score both models on the test split, draw the picture, print
        the report and write ``summary.json``; ``started`` is the run's ``perf_counter``."""
        layer: ChunkedKasminaLayer = self.model.hidden  # type: ignore[assignment]
        train_baseline(baseline, train, config)
        test_loss, test_acc, _ = evaluate(self.model, test)
        base_loss, base_acc, _ = evaluate(baseline, test)
        summary = layer.state.get_state_summary()
        result = DemoResult(
            completed=True,
            run_dir=config.run_dir,
            epochs=int(config.epochs),
            test_accuracy=test_acc,
            baseline_test_accuracy=base_acc,
            test_loss=test_loss,
            baseline_test_loss=base_loss,
            lives=self.controller.lives,
            final_states={k: v for k, v in summary.items() if v},
            seconds=time.perf_counter() - started,
            resumed_from_epoch=resumed_from,
        )
        from .demo_report import plot_lifecycle, print_report

        plot_lifecycle(self.records, config.run_dir / "lifecycle.png", int(config.seeds))
        print_report(result, self.records)
        (config.run_dir / "summary.json").write_text(json.dumps(summary_json(result) | self.extra, indent=2) + "\n")
        return result


def run_demo(config: DemoConfig, progress: bool = True, resume: bool = False) -> DemoResult:
    """Run (or resume) the demo; prints progress, the seed table and the comparison.

    Runs with one intra-op thread (restored afterwards): the model is tiny, so more
    threads only add synchronisation, and one thread keeps CPU runs bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, progress, resume)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, progress: bool, resume: bool) -> DemoResult:
    from tqdm import tqdm

    started = time.perf_counter()
    device = torch.device(config.device)
    run_dir = config.run_dir
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise DemoError(f"{run_dir} already exists; pick another --name, remove it, or --resume it")
    run_dir.mkdir(parents=True, exist_ok=True)
    train, val, test = load_digits_split(device)
    epochs = int(config.epochs)
    policy = scaled_policy(epochs, config.policy_fraction)
    model, baseline = build_models(config, policy)
    layer: ChunkedKasminaLayer = model.hidden  # type: ignore[assignment]
    controller = SeedController(layer, config.controller)
    manager = CheckpointManager(run_dir / "checkpoints", max_checkpoints_per_seed=3)

    start_epoch = 0
    resumed_from = None
    if resume:
        last_epoch, optimizer, checkpoint_id, skipped = load_run_checkpoint(manager, model, controller)
        start_epoch = resumed_from = last_epoch + 1
        print(f"resuming {run_dir} after epoch {last_epoch} from checkpoint {checkpoint_id}"
              + (f" (skipped {skipped} damaged newer checkpoint(s))" if skipped else ""))  # fmt: skip
        records = _read_records(run_dir / "telemetry.jsonl", upto=last_epoch)
    else:
        (run_dir / _CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        records = []
    telemetry = ExtendedTelemetry(layer)
    if records:
        telemetry.collect_lifecycle_metrics(records[-1]["epoch"])  # the rate continues from there
    if config.tensorboard and not tensorboard_available():
        raise DemoError("--tensorboard needs the tensorboard package: pip install tensorboard")
    board = TensorBoardWriter(run_dir / "tensorboard") if config.tensorboard else None
    writer = JsonlWriter(run_dir / "telemetry.jsonl", mode="w")
    for record in records:
        writer.write(record)

    print(banner(config, policy))
    bar = tqdm(range(start_epoch, epochs), desc="grow", unit="ep", disable=not progress, dynamic_ncols=True, leave=True)
    log = RunLog(model, controller, manager, telemetry, writer, bar, records, board)
    ablate = ablation_losses(model, val)
    with writer:
        for epoch in bar:
            train_metrics = train_epoch(model, optimizer, train, config, epoch)
            layer.step_epoch()
            val_loss, val_acc, predictions = evaluate(model, val)
            decisions = controller.step(epoch, val_loss, predictions, ablate)
            layer.sync_optimizer(optimizer, lr=config.blueprint_lr)
            log.epoch(epoch, train_metrics, (val_loss, val_acc), optimizer, decisions)
    bar.close()
    if board is not None:
        board.close()
    return log.finish(config, baseline, train, test, started, resumed_from)


def banner(config: DemoConfig, policy: Any, where: str = "") -> str:
    """The run's first line: the model, seeds, epochs and scaled minimum epochs."""
    return (
        f"kasmina demo{where}: digits, host Linear(64,{config.hidden})→ReLU→Linear({config.hidden},10), "
        f"{config.seeds} seeds, {int(config.epochs)} epochs, min epochs {policy_text(policy)}"
    )


def policy_text(policy: Any) -> str:
    """The policy's scaled minimum epochs of the growing states, e.g. ``TRAIN=3 GRAFT=2 ...``."""
    wanted = ("TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING")
    return " ".join(f"{s[:5]}={policy.min_epochs_of(s)}" for s in wanted)


def state_counts(layer: ChunkedKasminaLayer) -> str:
    """How many seeds are in each occupied state, e.g. ``DORM:2 TRAI:1 FOSS:1``."""
    summary = layer.state.get_state_summary()
    return " ".join(f"{name[:4]}:{n}" for name, n in summary.items() if n)


def _read_records(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["epoch"] <= upto]


def summary_json(result: DemoResult) -> dict[str, Any]:
    """The result as written to ``summary.json``."""
    return {
        "epochs": result.epochs,
        "test_accuracy": result.test_accuracy,
        "baseline_test_accuracy": result.baseline_test_accuracy,
        "test_loss": result.test_loss,
        "baseline_test_loss": result.baseline_test_loss,
        "final_states": result.final_states,
        "lives": [asdict(life) | {"outcome": life.outcome} for life in result.lives],
        "resumed_from_epoch": result.resumed_from_epoch,
    }
