"""``jtml fit|validate|test|predict``: LightningCLI with jtml's run directories and W&B set-up.

Every run gets its own directory ``<root>/<experiment>/<timestamp>-<id>/`` (root: the YAML's
``trainer.default_root_dir``, else ``runs``), holding ``config.yaml``, ``checkpoints/``, the
W&B offline run, ``run.json`` (status, provenance, checkpoint and final metrics) and
``data_files.sha256`` (the digest of every data file, for ``jtml reproduce``). Inputs are checked
before W&B starts. A run that fails before writing a checkpoint leaves no directory behind; one
that fails later is marked ``"status": "failed"`` (on any rank: the command then exits non-zero),
one stopped with Ctrl-C ``"interrupted"``, with the command that resumes it. Each command ends by
printing one JSON line: the summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import Namespace
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.trainer.states import TrainerStatus

from jtml._moved import is_subclass, same_class
from jtml.cli.links import add_links, check_checkpoint, class_path, follow_checkpoint_data, given
from jtml.data.segmentation import FluoroSegDataModule
from jtml.errors import JTMLError
from jtml.io import atomic_write
from jtml.runs.checkpoints import (
    AtomicCheckpointIO,
    LastCheckpointEveryEpoch,
    checkpoint_class_path,
    latest_resumable_run,
)
from jtml.runs.digests import DATA_FILES, data_file_digests, data_fingerprint, write_data_digests
from jtml.runs.provenance import git_info, package_versions
from jtml.runs.records import RUN_RECORD, wandb_run_id

# Data settings a trained model depends on: `validate/test/predict --ckpt_path` take them from the
# checkpoint's DataModule unless the command line gives them (a contradiction is an error).


def _jsonable(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in sorted(metrics.items()):
        value = float(v.item() if isinstance(v, torch.Tensor) else v)
        out[k] = value if math.isfinite(value) else None
    return out


class RecordingSaveConfig(SaveConfigCallback):
    """Saves the resolved config into the run directory (run-specific, so never a collision)
    and into every W&B run, together with the git commit and package versions."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        record = {"config": self.config.as_dict(), "git": git_info(), "versions": package_versions()}
        record["data_fingerprint"] = data_fingerprint(trainer.datamodule) if trainer.datamodule else None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(record)
                # Not trainer.log_dir: it broadcasts, and this runs on rank zero alone (DDP would hang).
                config_file = Path(trainer.default_root_dir) / self.config_filename
                if config_file.is_file():  # W&B syncs its run's files/ folder; its own config.yaml is taken
                    shutil.copy(config_file, Path(logger.experiment.dir) / "jtml-config.yaml")


class JTMLCLI(LightningCLI):
    """LightningCLI over any jtml LightningModule/DataModule named by ``class_path`` in the YAML."""

    _argv: list[str] = []
    _record_argv: list[str] | None = None
    _reproduces: str | None = None
    last_run_dir: Path | None = None  # the run directory of the latest command (`jtml reproduce`)
    summary_out: Any = None  # the command's stdout, which holds the one-line JSON summary only

    def __init__(self, args: list[str]) -> None:
        self.run_dir: Path | None = None
        self._resumed: Path | None = None  # `fit --ckpt_path last`: the run directory continued
        self.started = time.time()
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RecordingSaveConfig,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=None,
            args=args,
            auto_configure_optimizers=False,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """No abbreviations: ``--trainer.max_epoch`` is an unknown key, not ``max_epochs``."""
        return super().init_parser(**{"allow_abbrev": False, **kwargs})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_links(parser)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        cfg = self.config.get(str(self.config.get("subcommand")), self.config)
        seed = cfg.get("seed_everything")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise JTMLError(
                f"the experiment must set seed_everything to an integer (got {seed!r}); "
                "jtml never picks a silent seed"
            )
        # before LightningCLI reads the checkpoint's hyper-parameters into the model config
        self._resumed = self._resolve_ckpt_path(cfg, str(self.config.get("subcommand")), _experiment_dir(cfg))
        # also before: LightningCLI re-parses the checkpoint's model hyper-parameters, re-running the
        # data -> model links with whatever data settings the config holds by then
        follow_checkpoint_data(cfg, self._argv)
        check_checkpoint(cfg)

    # -- run directory -------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        # From here on stdout is the summary's alone: Lightning's progress bar, the writers' and
        # libraries' chatter go to stderr (``--help``/``--print_config`` printed to stdout before this).
        JTMLCLI.summary_out, sys.stdout = sys.stdout, sys.stderr
        cfg = self.config[self.subcommand]
        if self.subcommand == "predict":
            _predict_on_command_line_studies(cfg, self._argv)
        resumed = self._resumed
        if resumed is not None:  # `fit --ckpt_path last`: continue that run, in its directory
            os.environ["JTML_RUN_DIR"] = str(resumed)
        experiment_dir = _experiment_dir(cfg)
        self._created = next(
            (d for d in reversed([experiment_dir, *experiment_dir.parents]) if not d.exists()), None
        )
        self.run_dir = _new_run_dir(experiment_dir)
        JTMLCLI.last_run_dir = self.run_dir
        _ACTIVE.append(self)
        cfg.trainer.default_root_dir = str(self.run_dir)
        loggers = cfg.trainer.get("logger")
        for node in loggers if isinstance(loggers, list) else [loggers]:
            path = class_path(node)
            if is_subclass(path, WandbLogger):
                node.init_args.save_dir = str(self.run_dir)
                if resumed is not None and wandb_run_id(resumed):  # the same W&B run, continued
                    node.init_args.id = wandb_run_id(resumed)
                    node.init_args.resume = "allow"
                if not node.init_args.get("job_type"):
                    node.init_args.job_type = self.subcommand
            elif is_subclass(path, (CSVLogger, TensorBoardLogger)):
                node.init_args.save_dir = str(self.run_dir)
                node.init_args.name = node.init_args.get("name") or "csv"
                node.init_args.version = ""
        for node in cfg.trainer.get("callbacks") or []:
            if is_subclass(class_path(node), ModelCheckpoint) and not node.init_args.get("dirpath"):
                node.init_args.dirpath = str(self.run_dir / "checkpoints")

    def _resolve_ckpt_path(self, cfg: Namespace, subcommand: str, experiment_dir: Path) -> Path | None:
        """Check ``--ckpt_path`` before anything is created; resolve ``last`` to a real file.

        ``last`` means the newest ``checkpoints/last.ckpt`` (or SLURM ``hpc_ckpt_*``) among the
        experiment's runs; for ``fit`` that run's directory is returned, to be continued (none
        found: a fresh start, so a requeued SLURM script works on its first submission).
        """
        ckpt_path = cfg.get("ckpt_path")
        resumed = None
        if ckpt_path == "last":
            found = latest_resumable_run(experiment_dir)
            if found is None:
                if subcommand != "fit":
                    raise JTMLError("--ckpt_path last: no run with checkpoints/last.ckpt", experiment_dir)
                print(f"jtml: nothing to resume under {experiment_dir}; starting afresh", file=sys.stderr)
                cfg.ckpt_path = None
                return None
            resumed = found[0] if subcommand == "fit" else None
            cfg.ckpt_path = ckpt_path = str(found[1])
        if ckpt_path is None or ckpt_path in ("best", "hpc", "registry") or "://" in str(ckpt_path):
            return resumed
        if not Path(ckpt_path).is_file():
            raise JTMLError("checkpoint (--ckpt_path) not found", ckpt_path)
        expected = class_path(cfg.get("model"))
        found_class = checkpoint_class_path(Path(ckpt_path))
        if expected and found_class and not same_class(found_class, expected):
            raise JTMLError(f"checkpoint of a {found_class}, but the config's model is {expected}", ckpt_path)
        return resumed

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # write-then-rename checkpoints
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(LastCheckpointEveryEpoch())  # last.ckpt current every epoch: resumable
        return trainer

    # -- summaries -----------------------------------------------------------------------------
    def _wandb_run_dir(self) -> str | None:
        if not self.trainer.is_global_zero:  # elsewhere `experiment` is Lightning's dummy
            return None
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                return str(Path(logger.experiment.dir).parent.resolve())
        return None

    def write_record(self, status: str, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """``run.json``: ``running`` before fit (no W&B yet: starting it before Lightning's DDP
        launcher would break the launch), then ``finished`` with the final metrics."""
        assert self.run_dir is not None
        ckpt = next((c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        last = Path(ckpt.dirpath) / "last.ckpt" if ckpt and ckpt.dirpath else None
        record = {
            "status": status,
            "command": self.subcommand,
            "run_dir": str(self.run_dir.resolve()),
            "checkpoint": str(last) if last and last.is_file() else None,
            "best_checkpoint": (ckpt.best_model_path or None) if ckpt else None,
            "wandb_run": None if status == "running" else self._wandb_run_dir(),
            "metrics": _jsonable(metrics if metrics is not None else self.trainer.callback_metrics),
            "seconds": round(time.time() - self.started, 1),
            "git": git_info(),
            "versions": package_versions(),
            "data_fingerprint": data_fingerprint(dm) if (dm := self.trainer.datamodule) else None,
            "argv": ["jtml", *(self._record_argv or self._argv)],
        }
        if self._reproduces:
            record["reproduces"] = self._reproduces
        if self.trainer.is_global_zero:
            _write_json(self.run_dir / RUN_RECORD, record)
            digests = data_file_digests(dm) if dm is not None else None
            if digests and not (self.run_dir / DATA_FILES).is_file():
                write_data_digests(digests, self.run_dir / DATA_FILES)
        return record

    def _finish(self, metrics: dict[str, Any] | None = None) -> None:
        """Every rank reaches this point, then rank zero makes sure every other process exited
        cleanly before it records ``finished`` and prints the summary."""
        if self.trainer.world_size > 1:
            self.trainer.strategy.barrier("jtml-finish")
        if not self.trainer.is_global_zero:
            return
        failed = _failed_children(self.trainer)
        if failed:
            raise JTMLError(f"{failed}; the run is marked failed", self.run_dir)
        record = self.write_record("finished", metrics)
        if any(isinstance(lg, WandbLogger) for lg in self.trainer.loggers):
            import wandb

            wandb.finish()  # flush now, so the summary below is the last line of the output
        keys = ("run_dir", "checkpoint", "best_checkpoint", "wandb_run", "metrics")
        print(json.dumps({k: record[k] for k in keys}), file=JTMLCLI.summary_out or sys.stdout, flush=True)

    def _check_inputs(self, stage: str) -> None:
        """Every input the stage reads, checked before W&B starts (Lightning starts the logger's
        experiment before the DataModule's ``setup``): one error, nothing left behind."""
        dm = self.datamodule
        if dm is not None:
            dm.prepare_data()
            dm.setup(stage)
            if stage == "fit" and hasattr(dm, "check_train_batches"):
                dm.check_train_batches(self.trainer.num_devices * self.trainer.num_nodes)
        if stage == "predict":
            for cb in self.trainer.callbacks:
                if isinstance(cb, BasePredictionWriter):  # e.g. refuses a non-empty output folder
                    cb.setup(self.trainer, self.model, stage)

    def before_fit(self) -> None:
        self._check_inputs("fit")
        if _is_rank_zero():  # a killed or pre-empted run is then recognisable (and reproducible)
            self.write_record("running", {})
        self._started = True

    def before_validate(self) -> None:
        self._check_inputs("validate")

    def before_test(self) -> None:
        self._check_inputs("test")

    def before_predict(self) -> None:
        self._check_inputs("predict")

    def after_fit(self) -> None:
        self._finish()

    def after_validate(self) -> None:
        self._finish()

    def after_test(self) -> None:
        self._finish()

    def after_predict(self) -> None:
        self._finish()


def _predict_on_command_line_studies(cfg: Namespace, argv: list[str]) -> None:
    """`jtml predict --config X --ckpt_path C --data.init_args.studies [DIR]` predicts on exactly
    those folders (every frame): the experiment's own data (its synthetic study, index or split)
    is what it trained on, not what the command line asks about."""
    data = cfg.get("data")
    if not given(argv, "studies") or not is_subclass(class_path(data), FluoroSegDataModule):
        return
    args = data.init_args
    dropped = [k for k in ("synthetic", "index") if args.get(k)]
    args.synthetic, args.index, args.predict_split = None, None, "all"
    if dropped:
        print(
            f"jtml: predicting on the given studies only (not the experiment's {', '.join(dropped)})",
            file=sys.stderr,
        )


def _failed_children(trainer: pl.Trainer, timeout: float = 300.0) -> str | None:
    """Wait for the ranks this process launched (Lightning's subprocess launcher) and describe any
    that exited non-zero. Under SLURM/torchrun the ranks are the scheduler's, which reports them."""
    procs = list(getattr(trainer.strategy.launcher, "procs", None) or [])
    bad = []
    for rank, proc in enumerate(procs, start=1):
        try:
            code = proc.wait(timeout=timeout)
        except Exception:  # noqa: BLE001 - a rank that does not exit is a failure too
            code = "no exit"
        if code != 0:
            bad.append(f"rank {rank} exited with {code}")
    return ", ".join(bad) or None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _experiment_dir(cfg: Namespace) -> Path:
    """``<root>/<experiment>``: root from ``trainer.default_root_dir``, name from the last --config."""
    configs = cfg.get("config") or []
    experiment = Path(str(configs[-1])).stem if configs else "run"
    return Path(cfg.trainer.get("default_root_dir") or "runs") / experiment


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


def _new_run_dir(parent: Path) -> Path:
    """A fresh run directory, the same one on every rank of a distributed job.

    Lightning's DDP launcher starts the other ranks from rank 0's environment, so rank 0 puts
    the directory in ``JTML_RUN_DIR``; under SLURM every task derives it from the job id.
    """
    if os.environ.get("JTML_RUN_DIR"):
        run_dir = Path(os.environ["JTML_RUN_DIR"])
    elif os.environ.get("SLURM_JOB_ID"):
        run_dir = parent / f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    else:
        run_dir = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["JTML_RUN_DIR"] = str(run_dir)
    return run_dir


_ACTIVE: list[JTMLCLI] = []


def _abandon_runs(status: str = "failed") -> None:
    """After a failure: remove a run directory with no checkpoint, else mark it ``status``.

    On a rank other than zero only the mark is written (rank zero may be killed by Lightning's
    process observer as a consequence, with no chance to write it). ``interrupted`` (Ctrl-C) also
    prints the command that resumes the run, as the last line on stderr.
    """
    with contextlib.suppress(Exception):  # stop W&B writing into a folder about to be removed
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)
    for cli in _ACTIVE:
        run_dir = cli.run_dir
        if run_dir is None or not run_dir.exists():
            continue
        last = run_dir / "checkpoints" / "last.ckpt"
        if not any(run_dir.rglob("*.ckpt")):
            if _is_rank_zero():
                shutil.rmtree(run_dir, ignore_errors=True)
                created = getattr(cli, "_created", None)  # folders this run made: <root>/<experiment>
                for folder in run_dir.parents if created is not None else ():
                    with contextlib.suppress(OSError):
                        folder.rmdir()  # only when empty: other runs stay
                    if folder == created:
                        break
            continue
        if not _is_rank_zero() and not (run_dir / RUN_RECORD).is_file():
            continue  # rank zero has not recorded this run (or removed it): nothing to mark
        if cli._resumed is not None and not getattr(cli, "_started", False):
            continue  # a resume refused before it began: the run's own record stays as it was
        # keep what the record holds (argv, config, provenance): the run stays reproducible
        try:
            record = json.loads((run_dir / RUN_RECORD).read_text())
        except (OSError, ValueError):
            record = {"run_dir": str(run_dir.resolve())}
        record["status"] = status
        record["seconds"] = round(time.time() - cli.started, 1)
        record["checkpoint"] = str(last) if last.is_file() else record.get("checkpoint")
        _write_json(run_dir / RUN_RECORD, record)
        if status == "interrupted" and last.is_file() and cli.subcommand == "fit" and _is_rank_zero():
            print(f"resume with: {_resume_command(cli._argv)}", file=sys.stderr, flush=True)
    _ACTIVE.clear()


def _resume_command(argv: list[str]) -> str:
    """The interrupted command line with ``--ckpt_path last`` (replacing any ``--ckpt_path``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if not arg.startswith("--ckpt_path="):
            out.append(arg)
    return shlex.join(["jtml", *out, "--ckpt_path", "last"])


def _interrupted() -> bool:
    """Lightning turns Ctrl-C into ``sys.exit(1)`` after marking the trainer INTERRUPTED."""
    trainer = _ACTIVE[-1].trainer if _ACTIVE and hasattr(_ACTIVE[-1], "trainer") else None
    return trainer is not None and trainer.state.status == TrainerStatus.INTERRUPTED


def _find_jtml_error(exc: BaseException | None) -> JTMLError | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, JTMLError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_lightning(
    subcommand: str, args: list[str], record_argv: list[str] | None = None, reproduces: str | None = None
) -> int:
    """Run one Lightning sub-command; clean up or mark the run directory if it fails."""
    JTMLCLI._argv = [subcommand, *args]  # recorded in run.json for `jtml reproduce`
    JTMLCLI._record_argv = record_argv  # what to record instead (a reproduction: `reproduce RUN`)
    JTMLCLI._reproduces = reproduces
    JTMLCLI.last_run_dir = None
    _ACTIVE.clear()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        JTMLCLI([subcommand, *args])
    except SystemExit as e:  # jsonargparse printed its usage error already (it names the key)
        if _interrupted():
            _abandon_runs("interrupted")
            return 130  # the shell's code for a command stopped by SIGINT
        _abandon_runs()
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        _abandon_runs("interrupted")
        return 130
    except MisconfigurationException as e:  # e.g. more devices than this machine has
        _abandon_runs()
        raise JTMLError(f"trainer configuration cannot run here: {e}") from None
    except BaseException as e:
        _abandon_runs()
        cause = _find_jtml_error(e)
        if cause is not None and cause is not e:
            raise cause from None  # jsonargparse wraps errors raised while instantiating classes
        raise
    finally:
        if JTMLCLI.summary_out is not None:
            sys.stdout, JTMLCLI.summary_out = JTMLCLI.summary_out, None
        os.environ.pop("JTML_RUN_DIR", None) if _is_rank_zero() else None
    _ACTIVE.clear()
    return 0
