"""DataLoaders for jtml's DataModules: one place for batching, workers and the DDP sampler.

Training loaders shuffle and drop a ragged last batch; Lightning gives them its
DistributedSampler under DDP. Val/test/predict loaders get :class:`UnpaddedDistributedSampler`
under DDP, so every frame counts exactly once in the synced metrics.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from jtml.errors import JTMLError

__all__ = ["SplitLoaders", "UnpaddedDistributedSampler"]


class UnpaddedDistributedSampler(DistributedSampler):
    """Every rank takes every ``world_size``-th sample and nothing more.

    Lightning's default DistributedSampler pads the dataset with repeats so all ranks get equal
    lengths, which counts some val/test frames twice and biases the metrics; summed torchmetrics
    states make uneven shards harmless. Being a DistributedSampler, Lightning leaves it in place.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, shuffle=False, drop_last=False)
        self.indices = list(range(self.rank, len(dataset), self.num_replicas))
        self.num_samples = len(self.indices)

    def __iter__(self):  # noqa: ANN204
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SplitLoaders:
    """Mixin for a LightningDataModule with ``{train,val,test,predict}_dataset`` attributes and
    ``batch_size``, ``num_workers``, ``pin_memory``, ``persistent_workers``."""

    batch_size: int
    num_workers: int
    pin_memory: bool
    persistent_workers: bool

    def _loader(self, dataset: Dataset | None, name: str, train: bool = False) -> DataLoader:
        if dataset is None:
            raise JTMLError(f"{name} dataset is not set up; call setup() with the matching stage first")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = UnpaddedDistributedSampler(dataset) if distributed and not train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            sampler=sampler,
            # Equal-sized train batches (BatchNorm, per-step timing); the shuffle drops different
            # samples each epoch. Never for val/test/predict: those must see every sample once.
            drop_last=train and len(dataset) > self.batch_size,
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
