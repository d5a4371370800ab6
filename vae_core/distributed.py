"""Ray Train (TorchTrainer, DDP) around the pure-torch loop of :mod:`vae_core.training`.

The only module of the project that imports Ray. It knows nothing of files, params or MLflow:
the caller hands in a picklable ``data`` factory (returns ``(train_dataset, val_dataset)`` of
uint8 (C,H,W) tensors) and a picklable ``on_epoch(epoch, row, model)`` callback
(:data:`vae_core.training.EpochCallback`, as ``fit_local`` takes) that rank 0 calls after each
epoch.

Per worker: seed, build the model, wrap it in DDP, shard the data with a DistributedSampler
(``train_epoch`` calls ``set_epoch``), train / evaluate (metrics all-reduced inside), and every
epoch rank 0 writes one vae_core checkpoint (model, optimizer, scheduler, epoch, every rank's
RNG state, history, ``extra`` such as the MLflow run id) while every rank calls
``ray.train.report`` once. A restarted worker group (FailureConfig) or a re-run with the same
``RunConfig(name)`` and storage path picks the latest checkpoint up via
``ray.train.get_checkpoint`` and continues at the next epoch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vae_core.checkpoint import read_checkpoint, rebuild, save_checkpoint
from vae_core.model import ConvVAE, VAEConfig, unwrap
from vae_core.training import (
    EpochCallback,
    TrainConfig,
    evaluate_epoch,
    history_row,
    make_optimizer,
    make_scheduler,
    prepare_model,
    train_epoch,
)

log = logging.getLogger("retina_vae.distributed")

CHECKPOINT_FILE = "checkpoint.pt"  # the vae_core checkpoint inside each Ray checkpoint folder

# Ray Train V2 settings read from the driver's environment (and passed on to the controller and
# workers). A 0.5 s health-check poll (default 2 s) notices a finished or dead worker sooner; the
# rest keep a normal run's console to our own lines.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Prometheus metrics nobody reads on a laptop
    "RAY_DEDUP_LOGS": "1",
}
# Only for the embedded local Ray: there is no spot node to be preempted, and its watcher actor
# prints a C++ warning at every start.
LOCAL_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

DataFactory = Callable[[], tuple[Dataset, Dataset]]


@dataclass(frozen=True)
class Scaling:
    """How many Ray Train workers and what each one holds."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    # seconds Ray Train waits for a worker group's resources (a lost node, a busy cluster)
    # before the run fails; without a bound it retries the start-up forever
    startup_timeout_s: float = 120.0

    def resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs; pickled once to every worker."""

    model: VAEConfig
    train: TrainConfig
    data: DataFactory
    on_epoch: EpochCallback | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # copied into every checkpoint
    loader_workers: int = 0


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one flat row per epoch, as fit_local returns
    state: dict[str, Any]  # the latest checkpoint, as read_checkpoint returns it
    model: ConvVAE  # its weights, in eval mode on the CPU
    nodes: int  # distinct Ray nodes the last worker group ran on


# ----------------------------------------------------------------------------- Ray session


def set_quiet_env(local: bool) -> None:
    """Default Ray Train env settings (a user's own value always wins)."""
    for key, value in {**RAY_ENV_DEFAULTS, **(LOCAL_ENV_DEFAULTS if local else {})}.items():
        os.environ.setdefault(key, value)


def _beside_job_env(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """``runtime_env`` less the variables a Ray job's own runtime env already sets.

    A driver started by ``ray job submit`` runs with the job's runtime env (its variables are
    in this process's environment too), and ``ray.init`` refuses a second value for any of its
    keys, even an equal one.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set for a Ray job's driver only
    if not raw or not runtime_env:
        return runtime_env
    job_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    env_vars = {k: v for k, v in runtime_env.get("env_vars", {}).items() if k not in job_vars}
    return {**runtime_env, "env_vars": env_vars}


def init_ray(
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    num_cpus: int | None = None,
) -> None:
    """Start an embedded local Ray (``address=None``) or connect to a running cluster.

    The embedded Ray is this process's own: ``address="local"`` never joins another Ray
    found on the host (``ray start``, ``RAY_ADDRESS``), and its processes are pinned to it
    (:func:`_own_instance`). Quiet: no dashboard, Ray's own loggers at ERROR in every process
    (Train workers keep INFO for the application's lines). Connection failures propagate as
    Ray raises them.
    """
    set_quiet_env(local=address is None)
    kwargs: dict[str, Any] = {
        "logging_config": ray.LoggingConfig(log_level="ERROR"),
        "runtime_env": _beside_job_env(runtime_env),
    }
    if address is None:
        kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        kwargs["address"] = address
    # ray.LoggingConfig also reconfigures this process's root logger (level ERROR, one more
    # handler); the driver keeps its own logging, with only Ray's loggers turned down.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    if address is None:
        _own_instance(kwargs)
    else:
        ray.init(**kwargs)
    root.setLevel(level)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    logging.getLogger("ray").setLevel(logging.ERROR)
    _summarise_tracebacks()


def _own_instance(kwargs: dict[str, Any]) -> None:
    """``ray.init(**kwargs)`` of an embedded Ray whose worker processes know its address.

    Ray Train's placement-group cleaner (a detached actor) finds "its" cluster by scanning the
    host for Ray instances; with another Ray on the same machine (a shared lab server) it fails
    with a traceback ("Found multiple active Ray instances") or watches the wrong cluster. So
    the GCS port is chosen here and every worker gets ``RAY_ADDRESS`` = this instance.

    The cleaner asks the state API whether the Train controller is alive, at the dashboard
    address this instance records, even with no dashboard running: by default 127.0.0.1:8265,
    where another Ray's dashboard on the host answers "no such actor", and the cleaner then
    removes the live training's placement group (its workers are killed, training restarts
    or fails). So that address is a free port of this instance's own, where nothing answers
    (the cleaner then keeps waiting, and the embedded Ray ends with this process anyway).
    """
    port, dashboard_port = _free_port(), _free_port()
    env = dict(kwargs["runtime_env"] or {})
    env["env_vars"] = {**env.get("env_vars", {}), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(**{**kwargs, "runtime_env": env, "dashboard_port": dashboard_port})
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved


def _free_port() -> int:
    """A TCP port free on this host now (Ray binds the ones it is given right away)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TracebackSummary:
    """Wraps the driver's printer of Ray's process logs: each Python traceback that a Ray
    process logs (Ray Train's controller warns with one when the machine is overloaded; its
    placement-group cleaner when it loses track of a cluster) becomes one line, its exception
    line, counted; the full text stays in Ray's log files."""

    START = "Traceback (most recent call last)"
    GLUE = ("The above exception", "During handling of the above exception")

    def __init__(self, printer: Callable[[dict], None]) -> None:
        self.printer = printer
        self.count = 0
        self._inside: set[Any] = set()  # processes whose traceback is being read

    def __call__(self, data: dict) -> None:
        pid = data.get("pid")
        kept = [out for out in (self._line(line, pid) for line in data["lines"]) if out]
        if kept:
            self.printer({**data, "lines": kept})

    def _line(self, line: str, pid: Any) -> str | None:
        if line.startswith(self.START):
            self._inside.add(pid)
            return None
        if pid not in self._inside:
            return None if line.startswith(self.GLUE) else line
        if not line.strip() or line[:1].isspace() or line.startswith(self.GLUE):
            return None  # a frame, source line or chained-exception glue
        self._inside.discard(pid)
        self.count += 1
        return f"{line.strip()[:200]} [Ray traceback #{self.count} shortened; see Ray's logs]"


def _summarise_tracebacks() -> None:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for name, printer in list(dispatcher.handlers):
        if name == "ray_print_logs" and not isinstance(printer, TracebackSummary):
            dispatcher.remove_handler(name)  # re-added under its name: ray.shutdown removes it
            dispatcher.add_handler(name, TracebackSummary(printer))


def shutdown_ray() -> None:
    ray.shutdown()


def ray_is_initialized() -> bool:
    return ray.is_initialized()


def cluster_resources() -> dict[str, float]:
    """Total resources of the connected cluster, e.g. {"CPU": 2.0, "GPU": 0.0, ...}."""
    return dict(ray.cluster_resources())


def cluster_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected cluster (``ray.nodes()`` entries)."""
    return [n for n in ray.nodes() if n.get("Alive")]


def _stat(paths: list[str]) -> dict[str, tuple[int, int] | None]:
    out: dict[str, tuple[int, int] | None] = {}
    for path in paths:
        try:
            st = os.stat(path)
            out[path] = (st.st_size, st.st_mtime_ns)
        except OSError:
            out[path] = None
    return out


def on_every_node(
    fn: Callable[..., Any],
    *args: Any,
    env: dict[str, str] | None = None,
    nodes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``{node address (id): fn(*args)}``, run once on each of ``nodes`` (default: every alive
    node) as a zero-CPU task pinned there, with ``env`` set as a Ray worker's would be."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(fn)
    runtime_env = {"env_vars": env} if env else None
    refs = {
        node["NodeManagerAddress"] + f" ({node['NodeID'][:8]})": task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            runtime_env=runtime_env,
        ).remote(*args)
        for node in (cluster_nodes() if nodes is None else nodes)
    }
    return {name: ray.get(ref, timeout=120) for name, ref in refs.items()}


def stat_on_every_node(paths: list[str]) -> dict[str, dict[str, tuple[int, int] | None]]:
    """``{node address: {path: (size, mtime_ns) or None}}`` as seen from each alive node:
    tells a shared mount (same file everywhere) from a node-local path (missing, or another
    file of the same name)."""
    return on_every_node(_stat, paths)


# The variable that names the network interface of torch.distributed's backend.
IFNAME_VARIABLE = {False: "GLOO_SOCKET_IFNAME", True: "NCCL_SOCKET_IFNAME"}


def _interface_address(name: str) -> str | None:
    import psutil

    addrs = psutil.net_if_addrs().get(name, [])
    return next((a.address for a in addrs if a.family == socket.AF_INET), None)


def _hostname_address() -> str:
    """Gloo's default (torch's ProcessGroupGloo::createDefaultDevice): the first address the
    host name resolves to that a socket can bind, else the loopback address."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
    except OSError:
        return "127.0.0.1"
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind((sockaddr[0], 0))
            return sockaddr[0]
        except OSError:
            continue
    return "127.0.0.1"


def _first_interface_address() -> str:
    """NCCL's default: the first interface that is up and neither loopback nor docker."""
    import psutil

    for name, stats in psutil.net_if_stats().items():
        if stats.isup and not name.startswith(("lo", "docker")):
            address = _interface_address(name)
            if address:
                return address
    return "127.0.0.1"


def collective_address(use_gpu: bool) -> tuple[str, str | None]:
    """``(how, address)``: the address this node's torch.distributed backend (Gloo on CPU,
    NCCL on GPU) will advertise to the other ranks, and where it comes from; address None when
    the interface that ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` names does not exist."""
    variable = IFNAME_VARIABLE[use_gpu]
    name = os.environ.get(variable, "").split(",")[0]
    if name:
        return f"{variable}={name}", _interface_address(name)
    if use_gpu:
        return "the first network interface", _first_interface_address()
    return f"host name {socket.gethostname()}", _hostname_address()


def node_ip() -> str:
    """This node's address as the other Ray nodes reach it."""
    return ray.util.get_node_ip_address()


# ----------------------------------------------------------------------------- data


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s strided share of ``range(n)``, in order, without padding.

    For evaluation: the sums are all-reduced, so every image counts exactly once (the
    DistributedSampler would repeat images to even out the shards).
    """

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = range(rank, n, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(
    train_ds: Dataset,
    val_ds: Dataset,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Per-rank loaders: shuffled DistributedSampler for training, strided shards for val.

    The same call with ``rank=0, world=1`` gives the single-process baseline the same order.
    """
    common = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    train = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, **common)
    val_sampler = ShardSampler(len(val_ds), rank, world)  # type: ignore[arg-type]
    val = DataLoader(val_ds, batch_size=batch_size, sampler=val_sampler, **common)
    return train, val


# ----------------------------------------------------------------------------- worker loop


def build_model(spec: RunSpec) -> nn.Module:
    """Seeded model init: the same weights on every rank and in ``fit_local``'s baseline."""
    torch.manual_seed(spec.train.seed)
    return ConvVAE(spec.model)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s noise: each rank draws its own eps; rank 0 keeps ``seed``,
    so a one-worker run matches ``fit_local``."""
    return seed + rank


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's RNG states, restored per rank so a resumed run draws the same noise."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _gather(value: Any) -> list[Any]:
    """``value`` from every rank (index = rank); ``[value]`` outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
    world: int,
    device: torch.device,
) -> tuple[int, list[dict[str, float]]]:
    """Load the latest reported checkpoint, if any; return (first epoch to run, history)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        state = read_checkpoint(Path(folder) / CHECKPOINT_FILE)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng") or []
    if len(rng) == world:
        torch.set_rng_state(rng[rank]["cpu"])
        if "cuda" in rng[rank] and device.type == "cuda":
            torch.cuda.set_rng_state(rng[rank]["cuda"], device)
    else:  # a different world size: fresh but deterministic noise
        torch.manual_seed(state["epoch"] * 1000 + rank)
    if rank == 0:
        log.info("resuming after epoch %d from %s", state["epoch"] + 1, checkpoint.path)
    return state["epoch"] + 1, list(state.get("history", []))


def _report(
    spec: RunSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    history: list[dict[str, float]],
    rank: int,
    device: torch.device,
) -> None:
    """Rank 0 writes the checkpoint; every rank calls ray.train.report exactly once."""
    rng = _gather(_rng_state(device))  # collective: every rank takes part
    nodes = _gather(ray.get_runtime_context().get_node_id())
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_checkpoint(
                Path(folder) / CHECKPOINT_FILE,
                model,
                extra=spec.extra,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                epoch=epoch,
                rng=rng,
                history=history,
                worker_nodes=nodes,
            )
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(
            history[-1], checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:06d}"
        )


def _quiet_worker_logs() -> None:
    # Ray Train 2.60 logs every report at INFO through a logger named after its file path, so
    # RunConfig's LoggingConfig (which filters "ray.train.*") misses it: one line per rank and
    # epoch, each holding the whole metrics dict.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def worker_threads(assigned_cpus: float | None) -> int:
    """Intra-op threads for a worker holding ``assigned_cpus`` Ray CPUs: floor, at least 1.

    More threads than CPUs make DDP ranks on one machine fight over cores; fewer leave them idle.
    """
    return max(1, int(assigned_cpus or 1))


def _set_worker_threads() -> int:
    # Set explicitly: torch in a Ray worker otherwise follows OMP_NUM_THREADS, which Ray fills
    # in only when it is unset in the driver's environment.
    threads = worker_threads(ray.get_runtime_context().get_assigned_resources().get("CPU"))
    torch.set_num_threads(threads)
    return threads


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker function run by TorchTrainer (``config={"spec": RunSpec}``)."""
    spec: RunSpec = config["spec"]
    cfg = spec.train
    _quiet_worker_logs()
    _set_worker_threads()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    model = build_model(spec)
    torch.manual_seed(rank_seed(cfg.seed, rank))  # rank 0: as fit_local after the model
    model = prepare_model(model, cfg, device)  # device (and channels-last on GPU)
    model = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP when world > 1
    train_ds, val_ds = spec.data()
    train_loader, val_loader = make_loaders(
        train_ds,
        val_ds,
        cfg.batch_size,
        cfg.seed,
        rank,
        world,
        spec.loader_workers,
        pin_memory=device.type == "cuda",
    )
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    start, history = _restore(model, optimizer, scheduler, rank, world, device)

    for epoch in range(start, cfg.epochs):
        train = train_epoch(model, train_loader, optimizer, scheduler, cfg, epoch, device)
        # Evaluate the bare module: DDP's forward is not needed without gradients, and the
        # val shards may differ in length between ranks.
        val = evaluate_epoch(unwrap(model), val_loader, cfg, device)
        row = history_row(epoch, train, val)
        history.append(row)
        # Log before the report: ray.train.report is a barrier, so the other ranks wait there
        # rather than inside the next epoch's timed all-reduce.
        if rank == 0 and spec.on_epoch is not None:
            spec.on_epoch(epoch, row, unwrap(model))
        _report(spec, model, optimizer, scheduler, epoch, history, rank, device)


# ----------------------------------------------------------------------------- driver


def fit(
    spec: RunSpec,
    scaling: Scaling,
    storage_path: str,
    name: str,
    worker_env: dict[str, str] | None = None,
) -> FitResult:
    """Run ``train_loop`` on ``scaling.num_workers`` Ray Train workers; Ray must be initialised.

    ``storage_path`` (absolute, or an object-store URI) and ``name`` locate the run: a second
    call with the same pair resumes from its latest checkpoint. Raises
    ``ray.train.TrainingFailedError`` when the workers fail more than ``max_failures`` times.
    """
    set_quiet_env(local=False)
    # Ray Train reads the start-up bound from the driver's environment (and passes it on)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(scaling.startup_timeout_s)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources(),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            # controller_failure_limit=0: a worker group that does not start within the
            # timeout ends the run (Ray's default retries the start-up without limit)
            failure_config=ray.train.FailureConfig(
                max_failures=scaling.max_failures, controller_failure_limit=0
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep),
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    result = _fit_interruptibly(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} finished without a checkpoint")
    # Local storage is read in place; an object store is downloaded once.
    with result.checkpoint.as_directory() as folder:
        state = read_checkpoint(Path(folder) / CHECKPOINT_FILE)
    return FitResult(
        history=list(state.get("history", [])),
        state=state,
        model=rebuild(state),
        nodes=len(set(state.get("worker_nodes", []))),
    )


def _fit_interruptibly(trainer: Any) -> Any:
    """``trainer.fit()`` in a helper thread, so Ctrl-C stays this process's KeyboardInterrupt.

    From the main thread, Ray Train replaces the SIGINT handler with its own (abort the run,
    then exit 1 without a word); from another thread it leaves it alone. The caller stops the
    run on KeyboardInterrupt by shutting Ray down (the controller is owned by this driver).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as raised
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # short waits: the main thread must see SIGINT
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def is_training_failure(exc: BaseException) -> bool:
    """True for Ray Train's "workers failed / controller failed" errors."""
    return isinstance(exc, ray.train.TrainingFailedError)


def is_startup_timeout(exc: BaseException) -> bool:
    """True when the workers could not be placed within ``Scaling.startup_timeout_s``."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(getattr(exc, "controller_failure", None), WorkerGroupStartupTimeoutError)
