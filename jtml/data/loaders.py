"""DataLoaders for jtml's DataModules: one place for batching, workers and the DDP sampler.

Training loaders shuffle with :class:`EpochShuffle` and drop a ragged last batch: the order and
the augmentation seeds of epoch ``e`` depend on the run's seed and ``e`` alone, so a run resumed
from a checkpoint draws what the uninterrupted run drew (see the README's "Deterministic runs").
Val/test/predict loaders get Lightning's ``UnrepeatedDistributedSampler`` (no shuffle) under DDP:
every rank takes every ``world_size``-th sample and nothing more, so every frame counts exactly
once in the synced metrics (Lightning's default DistributedSampler pads with repeats, counting
some frames twice); summed torchmetrics states make uneven shards harmless.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from jtml.errors import JTMLError

__all__ = ["EpochSeeded", "EpochShuffle", "SplitLoaders", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (run seed, epoch): independent streams per epoch, no arithmetic overlap."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(epoch)]).generate_state(2, np.uint64)[0] >> 1)


class EpochSeeded:
    """Mixin for a Dataset whose augmentation draws must follow (seed, epoch), not process history.

    albumentations draws from the Compose's own generator, which forked workers would all inherit
    in the same state (identical augmentations across workers). So each process reseeds the
    Compose and :attr:`rng` once per stream: in a DataLoader worker from the worker's seed (torch
    derives it from the loader's generator, which :class:`EpochShuffle` seeds per epoch); in the
    main process (``num_workers=0``) from the seed :class:`EpochShuffle` hands over per epoch.
    (Never ``cv2.setNumThreads`` here: in a forked worker whose parent has started OpenCV's
    thread pool it waits forever for threads that were not forked.)
    """

    transform: object
    _seeded_for: tuple[int, int] | None = None
    _epoch_seed: int | None = None
    rng: np.random.Generator = np.random.default_rng(0)

    def set_epoch_seed(self, seed: int) -> None:
        self._epoch_seed = int(seed)

    def _reseed(self) -> None:
        info = get_worker_info()
        if info is not None:
            seed = info.seed
        else:
            seed = self._epoch_seed if self._epoch_seed is not None else torch.initial_seed()
        key = (os.getpid(), seed)
        if key == self._seeded_for:
            return
        self._seeded_for = key
        self.rng = np.random.default_rng(seed)
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed % 2**32)


class EpochShuffle(DistributedSampler):
    """The training sampler, on one process and under DDP alike: epoch ``e``'s permutation (each
    rank's share of it) and its augmentation seeds are functions of ``(seed, e)``.

    Lightning's single-process default (``RandomSampler``) draws from the global torch RNG,
    whose state after a resume differs from the uninterrupted run's; Lightning calls
    :meth:`set_epoch` before each epoch and keeps a DistributedSampler it finds in place.
    ``generator`` is the DataLoader's: reseeding it here makes the workers' seeds follow the epoch.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int, generator: torch.Generator) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        kwargs = {} if distributed else {"num_replicas": 1, "rank": 0}
        super().__init__(dataset, shuffle=True, seed=seed, drop_last=False, **kwargs)
        self.generator = generator
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        seed = epoch_seed(self.seed, epoch)
        self.generator.manual_seed(seed)
        if isinstance(self.dataset, EpochSeeded):
            self.dataset.set_epoch_seed(epoch_seed(seed, self.rank))


class SplitLoaders:
    """The loader part of :class:`~jtml.data.base.FluoroDataModule`, which sets these attributes:
    ``{train,val,test,predict}_dataset``, ``batch_size``, ``num_workers``, ``pin_memory``,
    ``persistent_workers`` and ``source`` (what errors name)."""

    batch_size: int
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    source: str
    train_dataset: Dataset | None
    val_dataset: Dataset | None
    test_dataset: Dataset | None
    predict_dataset: Dataset | None

    def check_train_batches(self, processes: int, share: int | None = None) -> None:
        """Refuse a training set in which a process's share holds no full batch: under DDP it would
        run no optimizer step at all (Lightning stops with "No training batches"), on one process a
        silently smaller batch than ``batch_size`` (which is per process)."""
        n = len(self.train_dataset) if self.train_dataset is not None else 0
        share = -(-n // processes) if share is None else share  # DistributedSampler pads to equal shares
        if share < self.batch_size:
            raise JTMLError(
                f"the train split has {n} samples: {share} per process with {processes} process(es), "
                f"fewer than batch_size {self.batch_size}, so no full batch (no optimizer step) - lower "
                f"data.init_args.batch_size to at most {max(share, 1)} or use fewer processes",
                self.source,
            )

    def _loader(self, dataset: Dataset | None, name: str, train: bool = False) -> DataLoader:
        if dataset is None:
            raise JTMLError(f"{name} dataset is not set up; call setup() with the matching stage first")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        generator = torch.Generator()
        sampler: DistributedSampler | None = None
        if train:
            trainer = getattr(self, "trainer", None)  # None outside a Trainer (scripts, notebooks)
            epoch = int(trainer.current_epoch) if trainer is not None else 0
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything, as Lightning reads it
            sampler = EpochShuffle(dataset, seed=seed, epoch=epoch, generator=generator)
            self.check_train_batches(sampler.num_replicas, share=len(sampler))
        elif distributed:
            processes = torch.distributed.get_world_size()
            if len(dataset) < processes:  # Lightning's sampler asserts this; say it plainly
                raise JTMLError(
                    f"the {name} set has {len(dataset)} sample(s), fewer than the {processes} processes: "
                    "each process needs at least one - use fewer devices or more data",
                    self.source,
                )
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=generator,
            # Equal-sized train batches (BatchNorm, per-step timing); the shuffle drops different
            # samples each epoch. Never for val/test/predict: those must see every sample once.
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, "predict")
