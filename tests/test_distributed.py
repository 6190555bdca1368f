"""Two CPU processes (gloo, torchrun) against one process with the same global batch.

Tolerance: per-step training losses within 1e-5 relative. The loss of a step weights every labelled
token of the global batch equally, so the split over ranks changes only the float summation order.
Evaluation must score each validation example exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_script

from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa
from noblankslate.train.track import read_metrics


def _step_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir) if r["event"] == "step"]


def _epochs(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["event"] == "epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, parallel):
    config = ProsQAConfig.small(concepts=(3, 4), distance=(2, 2))
    train = generate_prosqa(48, seed=0, config=config)
    valid = generate_prosqa(13, seed=1, config=config)  # odd: ranks get 7 and 6 examples
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "valid.json").write_text(json.dumps(valid))
    raw = {
        "save_path": str(tmp_path / "runs"), "coconut": True, "c_thought": 1, "epochs_per_stage": 1,
        "max_latent_stage": 2, "pad_latent_to_max": True, "train_path": str(tmp_path / "train.json"),
        "val_path": str(tmp_path / "valid.json"), "num_epochs": 2, "lr": 1e-3, "max_new_tokens": 6,
        "parallel": parallel, "model_config": {"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_script(path, "name=two", "batch_size_training=4", processes=2)
    run_script(path, "name=one", "batch_size_training=8")

    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    losses_one, losses_two = _step_losses(one), _step_losses(two)
    assert len(losses_one) == len(losses_two) == 12
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    for epoch_one, epoch_two in zip(_epochs(one), _epochs(two)):
        assert epoch_two["total"] == epoch_one["total"] == 13
        assert epoch_two["val_loss"] == pytest.approx(epoch_one["val_loss"], rel=1e-5)
    predictions = (two / "predictions_epoch_2.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["idx"] for line in predictions) == list(range(13))
    assert (two / "checkpoint_2" / "model.safetensors").is_file()


def _average_where_one_rank_has_no_gradient(rank: int, init_file: str, results: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from noblankslate.runtime import DistributedContext

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        module = torch.nn.Linear(2, 1)
        if rank == 0:  # rank 1's step gave no gradient (no contrastive loss on its micro-batch)
            module(torch.ones(1, 2)).sum().backward()
        context = DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        context.average_gradients(module)
        gathered = context.all_gather_rows(torch.full((rank + 1, 2), float(rank)))  # 1 row, then 2
        torch.save({"weight": module.weight.grad, "bias": module.bias.grad, "rows": gathered}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gradients_average_when_a_rank_has_none_and_rows_gather_in_rank_order(tmp_path):
    """Two gloo processes: a parameter with a gradient on one rank only averages with zeros on both (no
    rank waits forever on a collective the other skipped); uneven row counts gather in rank order."""
    import torch
    import torch.multiprocessing as mp

    results = str(tmp_path / "grad")
    mp.spawn(_average_where_one_rank_has_no_gradient, args=(str(tmp_path / "init"), results), nprocs=2)
    for rank in (0, 1):
        found = torch.load(f"{results}.{rank}")
        assert torch.equal(found["weight"], torch.full((1, 2), 0.5)) and torch.equal(found["bias"], torch.tensor([0.5]))
        assert torch.equal(found["rows"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
