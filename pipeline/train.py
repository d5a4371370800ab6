"""Stage ``retina-vae train``: the ConvVAE on Ray Train workers, tracked in one MLflow run.

Reads the preprocess arrays (``paths.processed``), trains with ``vae_core.distributed.fit``
(TorchTrainer, DDP, a checkpoint per epoch under ``paths.checkpoints``) and writes
``paths.model`` (vae_core checkpoint; ``extra`` = mlflow_run_id, params_hash, data_hash and the
preprocessing of its input, :func:`checkpoint_extra`),
``paths.train_metrics`` and ``paths.train_history``.

Resume: the Ray run is named after the hash of the params that shape training and of the
data, so re-running after an interruption finds its checkpoints and the MLflow run id
(``run.json`` beside them) and continues at the next epoch in the same MLflow run; changed
params or data give a new name, hence a fresh training and a fresh run. A finished training's
checkpoint folder is cleared when the stage is forced to run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline import cluster, ray_address, run_store, tracking
from pipeline.errors import UserError
from pipeline.io import atomic_path, write_json, write_table
from pipeline.params import Params
from pipeline.processed import (
    PREPROCESSING,
    ShardedArray,
    exists,
    image_files,
    images_path,
    open_images,
    open_path,
    preprocessing,
    read_record,
    split_sizes,
    table_path,
)
from pipeline.stage import run_stage
from vae_core import distributed
from vae_core.augment import AugmentConfig
from vae_core.checkpoint import save_checkpoint
from vae_core.model import VAEConfig
from vae_core.training import ACTIVE_UNIT_THRESHOLD, TrainConfig
from vae_core.views import ViewConfig

log = logging.getLogger("retina_vae.train")

REPO = Path(__file__).resolve().parents[1]
FIT_SPLITS = ("train", "val")  # the splits the model learns from (test is evaluate's)
N_EXAMPLES = 8  # val images shown in the reconstruction grids
# Params that change how the run is executed, not what it learns: changing them resumes, and
# dvc.yaml leaves them out of the train stage's params (tests/test_dvc.py keeps the two in step).
OPERATIONAL = {
    "train.max_failures",
    "train.image_every",
    "train.checkpoints_to_keep",
    "train.loader_workers",
    "train.startup_timeout_s",
    "train.cpus_per_worker",
    "train.gpus_per_worker",
    "cluster.address",
    "cluster.ship_code",
    "cluster.worker_env",
    "cluster.forward_env",
    "tracking.register_model",  # registering the model does not change what it learns
}
HISTORY_COLUMNS = [
    "epoch",
    "train_neg_elbo",
    "val_neg_elbo",
    "train_recon",
    "val_recon",
    "train_kl",
    "val_kl",
    "train_active_units",
    "val_active_units",
    "train_lr",
    "train_kl_weight",
    "train_images_per_s",
    "train_data_wait_share",  # share of the epoch spent waiting for the data loader
    "train_consistency",  # view objectives only (train.consistency/contrastive_weight > 0)
    "train_contrastive",
]
RUN_STATE = "run.json"  # beside Ray's checkpoints: the MLflow run this Ray run logs into
OUTBOX = "mlflow-outbox"  # beside them: epoch logs not yet sent to the tracking store


# ----------------------------------------------------------------------------- data


class ArrayDataset(Dataset):
    """One split's ``{split}_images.npy`` or shard folder ``{split}_images/`` (the Ray Data
    engine's output, :mod:`pipeline.processed`), memory-mapped: item i -> uint8 tensor (C,H,W).
    Shards index as one array, so samplers and the training order do not change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._images: np.ndarray | ShardedArray | None = None
        self.length = len(open_path(path))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}  # each process maps the file itself

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._images is None:
            self._images = open_path(self.path)
        return torch.from_numpy(np.array(self._images[i]))  # copy out of the map


class ProcessedData:
    """Picklable data factory for the Ray workers: ``() -> (train_dataset, val_dataset)``."""

    def __init__(self, processed: str | Path) -> None:
        self.processed = str(Path(processed).resolve())

    def __call__(self) -> tuple[ArrayDataset, ArrayDataset]:
        train, val = (ArrayDataset(str(images_path(self.processed, s))) for s in FIT_SPLITS)
        return train, val


def check_processed(processed: Path) -> tuple[int, int, int]:
    """(C, H, W) of the training arrays; a UserError naming the file if anything is off."""
    shapes = {}
    for split in FIT_SPLITS:
        path = images_path(processed, split)
        if not exists(processed, split):
            raise UserError(f"{path}: not found; run `retina-vae preprocess` first")
        try:
            images = open_path(path)
        except (ValueError, OSError) as exc:
            raise UserError(f"{path}: not a readable .npy array ({exc})") from None
        if images.dtype != np.uint8 or images.ndim != 4:
            raise UserError(f"{path}: expected uint8 (N,C,H,W), got {images.dtype} {images.shape}")
        shapes[split] = images.shape
    if shapes["train"][0] == 0:
        raise UserError(f"{images_path(processed, 'train')}: the training split is empty")
    if shapes["val"][0] == 0:  # its bound and active units would read 0, the best run's
        raise UserError(
            f"{images_path(processed, 'val')}: the val split is empty (the train stage reports "
            "its bound and active units on it); raise preprocess.val_fraction, the share of "
            "subjects in val, and re-run preprocess"
        )
    if shapes["train"][1:] != shapes["val"][1:]:
        raise UserError(f"{processed}: train and val images differ in shape")
    return tuple(int(v) for v in shapes["train"][1:])  # type: ignore[return-value]


def data_hash(processed: Path) -> str:
    """sha256 over the train/val arrays and tables the model learns from."""
    digest = hashlib.sha256()
    for split in FIT_SPLITS:
        for path in [*image_files(processed, split), table_path(processed, split)]:
            name = path.relative_to(processed).as_posix()  # shards: {split}_images/00000.npy
            if path.is_file():
                digest.update(name.encode())
                with path.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
    return digest.hexdigest()


def params_hash(params: Params) -> str:
    """sha256 of the params that shape the learned model (model and train groups)."""
    relevant = {
        k: v
        for k, v in params.flat().items()
        if k.split(".")[0] in ("model", "train") and k not in OPERATIONAL
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=list).encode()).hexdigest()


def checkpoint_extra(params: Params, processed: Path) -> dict[str, str]:
    """The checkpoint's ``extra`` before the MLflow run id is known: the params and data hashes,
    and the preprocessing that made the images it learns from (``ingest.modality``, ...:
    :data:`pipeline.processed.PREPROCESSING`, as preprocess recorded it beside them), which
    ``retina-vae encode`` applies to new ones. Params that say otherwise get a warning line
    each; a folder without the record, one warning, and the params' values are recorded."""
    stated = preprocessing(params.flat())
    made = read_record(processed)
    if made is None:
        log.warning(
            "%s does not record how its images were made (preprocessed before it was kept): "
            "the model records the params' %s; re-run preprocess to record them",
            processed,
            ", ".join(PREPROCESSING),
        )
        made = stated
    for key in PREPROCESSING:
        if made[key] != stated[key]:
            log.warning(
                "%s: the processed images were made with %s; params say %s: the model records "
                "%s (re-run preprocess to train on images made with %s)",
                key, made[key], stated[key], made[key], stated[key],
            )  # fmt: skip
    return {"params_hash": params_hash(params), "data_hash": data_hash(processed), **made}


def model_config(params: Params, shape: tuple[int, int, int]) -> VAEConfig:
    c, h, w = shape
    m = params.model
    return VAEConfig(
        in_channels=c,
        height=h,
        width=w,
        widths=m.widths,
        latent_dim=m.latent_dim,
        likelihood=m.likelihood,
        arch=m.arch,
        blocks_per_stage=m.blocks_per_stage,
    )


def train_config(params: Params) -> TrainConfig:
    t = params.train
    return TrainConfig(
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        weight_decay=t.weight_decay,
        lr_schedule=t.lr_schedule,
        grad_clip=t.grad_clip,
        beta=t.beta,
        kl_warmup_epochs=t.kl_warmup_epochs,
        samples=t.samples,
        seed=t.seed,
        bf16=t.bf16,
        channels_last=t.channels_last,
        cpu_bf16=t.cpu_bf16,
        cpu_channels_last=t.cpu_channels_last,
        compile=t.compile,
        free_bits=t.free_bits,
        augment=AugmentConfig(t.augment_rotation, t.augment_jitter, t.augment_hflip),
        view=ViewConfig(
            crop_scale=t.view_crop_scale,
            rotation=t.view_rotation,
            jitter=t.view_jitter,
            noise=t.view_noise,
            mask_ratio=t.view_mask_ratio,
            mask_patch=t.view_mask_patch,
            consistency_weight=t.consistency_weight,
            contrastive_weight=t.contrastive_weight,
            contrastive_temperature=t.contrastive_temperature,
        ),
    )


def scaling(params: Params) -> distributed.Scaling:
    t = params.train
    return distributed.Scaling(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        cpus_per_worker=t.cpus_per_worker,
        gpus_per_worker=t.gpus_per_worker,
        max_failures=t.max_failures,
        checkpoints_to_keep=t.checkpoints_to_keep,
        startup_timeout_s=t.startup_timeout_s,
    )


# ----------------------------------------------------------------------------- cluster


def connect(params: Params, uri: str) -> bool:
    """Start or join Ray; return True when this call started it (and must shut it down)."""
    address = params.cluster.address
    env: dict[str, Any] = {"env_vars": cluster.worker_env(params, uri)}
    if address is not None:
        ray_address.check_address(address)
    cores = os.cpu_count() or 1
    if address is None:  # this host's cores: other queued experiments may want them too
        warning = cluster.shared_cores_warning(params, cluster.other_trainings(), cores)
        if warning is not None:
            log.warning("%s", warning)
    if distributed.ray_is_initialized():
        return False  # a session opened by the caller (tests, notebooks) is reused
    if address is None:
        distributed.init_ray(None, num_cpus=cores)
        return True
    if params.cluster.ship_code:
        env["py_modules"] = [str(REPO / "pipeline"), str(REPO / "vae_core")]
    try:
        distributed.init_ray(address, runtime_env=env)
    except ConnectionError as exc:
        raise UserError(f"cluster.address: cannot connect to Ray at {address} ({exc})") from None
    return True


def check_resources(params: Params) -> None:
    """Fail early (one line) when the cluster cannot hold the requested workers."""
    t = params.train
    have = distributed.cluster_resources()
    if t.use_gpu:
        need = t.num_workers * t.gpus_per_worker
        if have.get("GPU", 0.0) < need:
            raise UserError(
                f"train.use_gpu is true but the Ray cluster has {have.get('GPU', 0.0):g} GPU(s) "
                f"for {t.num_workers} worker(s) x {t.gpus_per_worker:g}; set train.use_gpu: false "
                "or add GPU nodes"
            )
    need_cpu = t.num_workers * t.cpus_per_worker
    if have.get("CPU", 0.0) < need_cpu and params.cluster.address is None:
        raise UserError(
            f"train.num_workers x train.cpus_per_worker = {need_cpu:g} CPUs but this machine "
            f"offers {have.get('CPU', 0.0):g}; lower them"
        )


def check_shared_storage(storage: str, processed: Path) -> None:
    """On a multi-node cluster every node must see the same data and checkpoint folder (an
    object store is the same for every node)."""
    if len(distributed.cluster_nodes()) < 2:
        return
    files = {str(f): "paths.processed" for s in FIT_SPLITS for f in image_files(processed, s)}
    marker = Path(storage) / f".shared-check-{os.getpid()}"
    if not run_store.is_uri(storage):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("retina-vae")
        files[str(marker)] = "paths.checkpoints"
    try:
        local = {path: (os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files}
        for node, seen in distributed.stat_on_every_node(list(files)).items():
            for path, key in files.items():
                if seen.get(path) != local[path]:
                    raise UserError(
                        f"{key}: {Path(path).parent} is not visible from Ray node {node}; on a "
                        "multi-node cluster data and checkpoints must be on storage every node "
                        "mounts at the same path (NFS, a shared disk) - see README, Scaling out"
                    )
    finally:
        if str(marker) in files:
            marker.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- outputs


def write_outputs(params: Params, result: distributed.FitResult, extra: dict[str, str]) -> None:
    """paths.model, paths.train_metrics, paths.train_history; all atomic."""
    last = result.history[-1]
    with atomic_path(params.paths.model) as tmp:
        save_checkpoint(tmp, result.model, extra=extra, epoch=int(last["epoch"]))
    history = pd.DataFrame(result.history)
    write_table(params.paths.train_history, history[[c for c in HISTORY_COLUMNS if c in history]])
    summary = {k: v for k, v in last.items() if "kl_dim_" not in k}
    write_json(
        params.paths.train_metrics,
        {
            "epochs": int(last["epoch"]) + 1,
            "workers": params.train.num_workers,
            "nodes": result.nodes,
            "train": {k[6:]: v for k, v in summary.items() if k.startswith("train_")},
            "val": {k[4:]: v for k, v in summary.items() if k.startswith("val_")},
        },
    )


# A latent dim copies the prior when its mean KL(q(z_j|x) || p(z_j)) is under this, in nats.
PRIOR_COPY_NATS = 0.01


def active_units_summary(active: float, kl_per_dim: list[float]) -> str:
    """'A of J latent units active' (Burda et al.: Var_x(mu_j) > ACTIVE_UNIT_THRESHOLD), with a
    hint when under a quarter are. The hint reads the per-dim KL (nats), since the two kinds of
    inactive unit need different cures: C copy the prior (KL < PRIOR_COPY_NATS: posterior
    collapse, where free bits or a KL warm-up help), and the other J - A - C carry KL with means
    that vary less than the absolute threshold (a narrow posterior, as a learned Gaussian scale
    can give), which the linear probe, on standardised means, still reads."""
    latent_dim = len(kl_per_dim)
    text = f"{int(active)} of {latent_dim} latent units active"
    if active >= latent_dim / 4:
        return text
    copies = sum(kl < PRIOR_COPY_NATS for kl in kl_per_dim)
    others = max(latent_dim - int(active) - copies, 0)
    notes = []
    if copies:
        notes.append(
            f"{copies} copy the prior: try train.free_bits 0.1-0.5, train.kl_warmup_epochs, "
            "or train.beta < 1"
        )
    if others:
        notes.append(
            f"{others} carry KL >= {PRIOR_COPY_NATS} nats but their means vary less than "
            f"{ACTIVE_UNIT_THRESHOLD}: narrow posteriors (per-dim KL: the run's "
            "training/kl_per_dim.csv)"
        )
    return f"{text} ({'; '.join(notes)})" if notes else text


def _examples(processed: Path) -> np.ndarray:
    val = open_images(processed, "val")
    source = val if len(val) else open_images(processed, "train")
    return np.array(source[:N_EXAMPLES])  # (n,C,H,W) uint8


def _read_state(run_dir: str) -> dict[str, Any]:
    return run_store.read_json(run_store.join(run_dir, RUN_STATE))


# ----------------------------------------------------------------------------- stage


def run(params: Params, args: argparse.Namespace | None = None) -> None:
    """The stage body (see module docstring)."""
    processed = Path(params.paths.processed).resolve()
    shape = check_processed(processed)
    extra = checkpoint_extra(params, processed)
    uri = tracking.resolve_tracking_uri(params.tracking)
    storage = run_store.location(params.paths.checkpoints)  # a folder or an object-store URI
    name = f"train-{extra['params_hash'][:10]}-{extra['data_hash'][:10]}"
    run_dir = run_store.join(storage, name)

    tracking.check_store(uri)  # before anything is started or deleted
    started = connect(params, uri)
    try:
        check_resources(params)
        cluster.check_collective(params, cluster.worker_env(params, uri))
        check_shared_storage(storage, processed)
        check_tracking_from_workers(uri)
        params_path = Path(args.params if args else "params.yaml")
        run_id = _open_run(params, uri, run_dir, extra, params_path)
        job = _Job(shape, extra, uri, storage, name, processed)  # extra has the run id now
        try:  # whatever stops the run before its end marks it KILLED or FAILED, not RUNNING
            result = _train_and_log(params, job)
        except BaseException as exc:
            _finish_anyway(
                uri, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            )
            raise
        tracking.finish_run(uri, run_id)
        state = {"mlflow_run_id": run_id, "finished": True, **extra}
        run_store.write_json(run_store.join(run_dir, RUN_STATE), state)
        last = result.history[-1]
        log.info(
            "done: %d epochs, val -ELBO %.2f, %s; wrote %s",
            int(last["epoch"]) + 1,
            last["val_neg_elbo"],
            active_units_summary(
                last["val_active_units"],
                [last[f"val_kl_dim_{j}"] for j in range(params.model.latent_dim)],
            ),
            params.paths.model,
        )
        log.info("MLflow run page (model-training view): %s", tracking.run_url(uri, run_id))
    finally:
        if started:
            distributed.shutdown_ray()


def _finish_anyway(uri: str, run_id: str, status: str) -> None:
    """Mark the run ``status`` if the store answers; the error being raised matters more."""
    try:
        with tracking.one_try():
            tracking.finish_run(uri, run_id, status)
    except Exception as exc:  # the store may be what failed
        log.warning("could not mark MLflow run %s %s (%s)", run_id, status, type(exc).__name__)


def check_tracking_from_workers(uri: str) -> None:
    """A tracking server must answer from every Ray node, not only here: rank 0 logs from
    wherever Ray places it (``http://127.0.0.1:...`` on the head is another machine's loopback
    on a worker node)."""
    if not uri.startswith(("http://", "https://")):
        return  # a sqlite file or folder: check_shared_storage's business
    for node, why in distributed.on_every_node(tracking.probe, uri).items():
        if why is not None:
            host = urlsplit(uri).hostname
            raise UserError(
                f"tracking.uri: {uri} answers here but not from Ray node {node} ({why}); use "
                f"an address every node reaches, e.g. {uri.replace(host, distributed.node_ip())} "
                "with the server started as `mlflow server --host 0.0.0.0`"
            )


def _open_run(
    params: Params, uri: str, run_dir: str, extra: dict[str, str], params_path: Path
) -> str:
    """Start (or resume, after an interruption) the MLflow run of this training; a finished
    run of the same params and data starts afresh. Sets ``extra["mlflow_run_id"]``. A new run
    is named after the DVC experiment and the params that differ from the committed
    ``params_path``, and tagged with the experiment (:func:`pipeline.tracking.run_labels`)."""
    state = _read_state(run_dir)
    fresh = bool(state.get("finished"))
    name, dvc_tags = tracking.run_labels(params.flat(), params_path, REPO / "params.yaml")
    run_id, resumed = tracking.start_run(
        uri,
        params.tracking.experiment,
        params=params.flat(),
        tags={
            "data_hash": extra["data_hash"],
            "params_hash": extra["params_hash"],
            **tracking.lineage_tags(REPO, "train", tracking.pipeline_files(params, params_path)),
            **dvc_tags,
        },
        run_id=None if fresh else state.get("mlflow_run_id"),
        run_name=name,
    )
    if fresh:  # deleted only once the new run exists (a store that fails keeps it)
        log.info("a finished training with these params and data exists: starting afresh")
        run_store.remove_tree(run_dir)
    extra["mlflow_run_id"] = run_id
    log.info(
        "%s MLflow run %s at %s; checkpoints in %s",
        "resuming" if resumed else "new",
        run_id,
        uri,
        run_dir,
    )
    state = {"mlflow_run_id": run_id, "finished": False, **extra}
    run_store.write_json(run_store.join(run_dir, RUN_STATE), state)
    return run_id


@dataclass(frozen=True)
class _Job:
    """What :func:`run` settles before training: the data, its hashes, MLflow and the run's
    Ray Train storage (``storage / name``)."""

    shape: tuple[int, int, int]  # (C, H, W) of the training images
    extra: dict[str, str]  # checkpoint_extra and mlflow_run_id
    uri: str
    storage: str  # paths.checkpoints: an absolute folder or an object-store URI
    name: str
    processed: Path

    @property
    def outbox(self) -> Path:
        """Rank 0's epoch logs not yet sent: beside the run's checkpoints in a folder, else
        (checkpoints on object storage) beside the processed data; both every node sees."""
        if run_store.is_uri(self.storage):
            return self.processed.parent / OUTBOX / self.name
        return Path(self.storage) / self.name / OUTBOX


def _train_and_log(params: Params, job: _Job) -> distributed.FitResult:
    """:func:`_fit`, write the stage outputs, then log the data, model and checkpoint to the
    run."""
    run_id = job.extra["mlflow_run_id"]
    sizes = split_sizes(job.processed)  # the run's Datasets panel: what it learns from
    tracking.log_training_data(
        job.uri, run_id, params.paths.processed, job.extra["data_hash"], sizes
    )
    examples = _examples(job.processed)  # (n,C,H,W) uint8: epoch grids, the model signature
    result = _fit(params, job, examples)
    write_outputs(params, result, job.extra)
    outbox = tracking.Outbox(job.uri, run_id, job.outbox)
    if tracking.probe(job.uri) is not None or not outbox.send():  # one line, not two
        raise UserError(
            f"training finished and {params.paths.model} is written, but the tracking server "
            f"{job.uri} is unreachable: {len(outbox.waiting())} epoch(s) of logs wait in "
            f"{outbox.folder}; run the stage again once it answers to send them and log the model"
        )
    try:  # one try per request: a store that dies now costs seconds, not MLflow's retries
        with tracking.one_try():
            tracking.log_model(
                job.uri,
                run_id,
                result.model,
                examples[:2],
                code_paths=[REPO / "vae_core"],
                step=int(result.history[-1]["epoch"]),  # the final metrics go onto the model
                register_as=params.tracking.register_model,
            )
            tracking.log_kl_profile(job.uri, run_id, result.history)
            tracking.client(job.uri).log_artifact(run_id, params.paths.model, "checkpoint")
    except Exception as exc:  # the store failed after the epochs were sent
        raise UserError(
            f"training finished and {params.paths.model} is written, but logging the model to "
            f"{tracking.without_user(job.uri)} failed ({tracking.store_reason(exc)}); run the "
            "stage again once it answers to log it"
        ) from None
    return result


def _fit(params: Params, job: _Job, examples: np.ndarray) -> distributed.FitResult:
    """distributed.fit, its failure after ``train.max_failures`` restarts a UserError."""
    t = params.train
    spec = distributed.RunSpec(
        model=model_config(params, job.shape),
        train=train_config(params),
        data=ProcessedData(job.processed),
        on_epoch=tracking.EpochLogger(
            job.uri,
            job.extra["mlflow_run_id"],
            t.epochs,
            t.image_every,
            examples,
            str(job.outbox),
            t.seed,
        ),
        extra=dict(job.extra),
        loader_workers=t.loader_workers,
    )
    try:
        return distributed.fit(
            spec, scaling(params), job.storage, job.name, cluster.worker_env(params, job.uri)
        )
    except Exception as exc:
        if not distributed.is_training_failure(exc):
            raise
        if distributed.is_startup_timeout(exc):
            raise UserError(
                f"the {t.num_workers} Ray Train worker(s) did not start within "
                f"train.startup_timeout_s = {t.startup_timeout_s:g} s: the cluster cannot place "
                f"{t.num_workers} x {scaling(params).resources()} (a node lost or busy); "
                "re-run the stage to resume from the last checkpoint once it can"
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"training failed after {t.max_failures} restart(s) ({first[:200]}); "
            "re-run the stage to resume from the last checkpoint"
        ) from exc


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        "train",
        argv,
        run,
        description="Train the conv-VAE with Ray Train (DDP) on the preprocess outputs, "
        "tracked in MLflow; resumes an interrupted training.",
    )
