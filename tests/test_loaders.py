"""Both DataModules under 2-process DDP (gloo): val/test/predict shard every sample exactly once
(no DistributedSampler padding), training keeps Lightning's shuffling sampler."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

from jtml.data.pose import FluoroPoseDataModule
from jtml.data.segmentation import FluoroSegDataModule
from jtml.sim.synth import generate_study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, study: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seg = FluoroSegDataModule(
            studies=[study], image_size=64, batch_size=2, num_workers=0, val_fraction=0.3, test_fraction=0.0
        )
        seg.setup("fit")
        pose = FluoroPoseDataModule(
            parts=["fem", "tib"], render=True, roi_size=32, train_samples=8, val_samples=5, batch_size=2,
            num_workers=0, image_size=256,
        )  # fmt: skip
        pose.setup("fit")
        seen = {}
        for name, dm in (("seg", seg), ("pose", pose)):
            loader = dm.val_dataloader()
            assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
            seen[name] = (list(loader.sampler), len(dm.val_dataset))
            assert not isinstance(dm.train_dataloader().sampler, UnrepeatedDistributedSampler)
        out[rank] = seen
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_val_shards_cover_every_sample_once_under_ddp(tmp_path):
    study = generate_study(tmp_path / "s", frames=10, seed=0, size=64, progress=False)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), str(study), out), nprocs=2, join=True)
        results = dict(out)
    for name in ("seg", "pose"):
        (a, n), (b, m) = results[0][name], results[1][name]
        assert n == m and n % 2 == 1, (name, n)  # odd: a padding sampler would repeat one sample
        assert sorted(a + b) == list(range(n)) and not set(a) & set(b), name
