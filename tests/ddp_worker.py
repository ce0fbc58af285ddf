"""Worker for tests/test_distributed.py, started by ``torch.distributed.run`` with 2 CPU processes (gloo).

Each rank pretrains SimCLR on its shard of every global batch and writes checksums of the batches it saw and
of its final weights, so the test can prove that gradients were synchronised (identical weights on every rank)
although the ranks saw different images.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from support import make_tiny_store  # noqa: E402

from radssl.config import load_config  # noqa: E402
from radssl.engine.pretrain import pretrain, view_context  # noqa: E402
from radssl.views.policies import TwoViewPolicy  # noqa: E402


class RecordingPolicy(TwoViewPolicy):
    """Two-view policy that records a checksum of the stored images each step serves (passed as policy=)."""

    name = "recording_two_view"

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.batch_sums: list[float] = []

    def __call__(self, rows, images, columns, generator):  # noqa: ANN001, ANN204
        self.batch_sums.append(float(images.index_select(0, rows).double().sum()))
        return super().__call__(rows, images, columns, generator)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    config = load_config(
        None,
        [
            f"output_dir={out_dir}/run",
            "model.backbone=small_cnn",
            "train.accelerator=cpu",
            "train.devices=2",
            "train.strategy=ddp",
            "train.steps=3",
            "train.batch_size=8",
            "train.progress_bar=false",
            "train.checkpoint_every=2",
            "eval.enabled=false",
            "optim.optimizer=sgd",
            "optim.lr=0.5",
        ],
    )
    store = make_tiny_store(n=64)
    policy = RecordingPolicy(config.views.settings(), view_context(config, store, channels_last=False))
    result = pretrain(config, store=store, policy=policy)
    batch_sums = policy.batch_sums
    # Parameters only: BatchNorm running statistics are per-rank between DDP's buffer broadcasts.
    weights = {k: float(v.detach().double().sum()) for k, v in result.method.named_parameters()}
    report = {
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "batch_sums": batch_sums,
        "weights": weights,
        "checkpoint_exists": result.checkpoint.is_file(),
    }
    Path(out_dir, f"rank{report['rank']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
