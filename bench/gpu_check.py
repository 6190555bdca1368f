"""Every check that needs a GPU, in one call that fits a short device lease; writes a JSON report.

    python bench/gpu_check.py --out $OUT/gpu_check.json            # on the GPU machine (about 5-8 minutes)
    python bench/gpu_check.py --device cpu --quick --out report.json  # the same checks on a CPU, tiny

Needs only torch and transformers (plus this project's pure-Python dependencies), no internet, no weights.
Each check runs under its own time budget and records its result or its error, so one failure does not hide
the others:

1. ``env``: torch, CUDA, the device.
2. ``bf16_autocast``: Coconut forward+backward of a small GPT-2 in fp32 and under bf16 autocast; the two
   losses and the gradient norms must be close.
3. ``fsdp_nccl``: ``torchrun --nproc_per_node 1 -m noblankslate.cli train`` with ``parallel=fsdp bf16=true``
   on generated data (nccl on a GPU, gloo on a CPU): exit status and the run's last loss.
4. ``bench_coconut``: ``bench/bench_coconut.py --device ... --quick`` (its printed tables are kept).
5. ``gpt2_small_epoch``: steps per second of a GPT-2-small-shape Coconut (from scratch, 12 x 768, the
   GPT-2 BPE of the offline package) on generated ProsQA at the paper's batch 32, timed over a fixed
   number of steps at stage 0 and at the final stage, and the epoch time they imply for 17,886 examples.
6. ``table1_balanced``: ``nbs experiment`` on the balanced task with a larger budget than a CPU allows
   (seconds permitting), to see whether the rows separate when the model can learn the lookup.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], timeout: float, cwd: Path | None = None) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        return {"command": " ".join(command), "returncode": done.returncode, "seconds": time.perf_counter() - started,
                "stdout_tail": done.stdout[-4000:], "stderr_tail": done.stderr[-3000:]}
    except subprocess.TimeoutExpired as error:
        return {"command": " ".join(command), "returncode": None, "timeout": timeout,
                "stdout_tail": (error.stdout or b"")[-4000:].decode(errors="replace") if isinstance(error.stdout, bytes)
                else (error.stdout or "")[-4000:], "ok": False}


def check_env(device: str) -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda_available": torch.cuda.is_available()}
    if device == "cuda":
        info.update(device_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def check_bf16(device: str) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from noblankslate.model.coconut import Coconut

    torch.manual_seed(0)
    vocab, start, end, latent = 203, 200, 201, 202
    base = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=vocab, n_positions=256,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(device)
    model = Coconut(base, latent, start, end, eos_token_id=0)
    rows = []
    for _ in range(8):
        question = torch.randint(1, 199, (40,)).tolist()
        rows.append(question + [start] + [latent] * 4 + [end] + torch.randint(1, 199, (10,)).tolist())
    ids = torch.tensor(rows, device=device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :46] = -100
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model.zero_grad()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = model(ids, mask, labels=labels, return_logits=False).loss
        loss.backward()
        grad = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
        out[name] = {"loss": float(loss), "grad_norm": float(grad)}
    out["loss_relative_difference"] = abs(out["bf16"]["loss"] - out["fp32"]["loss"]) / abs(out["fp32"]["loss"])
    out["grad_norm_relative_difference"] = abs(out["bf16"]["grad_norm"] - out["fp32"]["grad_norm"]) / out["fp32"]["grad_norm"]
    out["ok"] = out["loss_relative_difference"] < 0.02 and out["grad_norm_relative_difference"] < 0.1
    return out


def _tiny_task(folder: Path, train: int, valid: int) -> tuple[Path, Path]:
    from noblankslate.data.balanced import BalancedConfig, generate_balanced

    task = BalancedConfig(branches=(2, 2), distance=(1, 3))
    examples = generate_balanced(train, seed=0, config=task)
    held = generate_balanced(valid, seed=1, config=task, exclude_questions={e["question"] for e in examples})
    paths = folder / "train.json", folder / "valid.json"
    paths[0].write_text(json.dumps(examples))
    paths[1].write_text(json.dumps(held))
    return paths


def check_fsdp(device: str, folder: Path, timeout: float) -> dict:
    import yaml

    train, valid = _tiny_task(folder, 256, 32)
    config = {"coconut": True, "c_thought": 1, "epochs_per_stage": 1, "max_latent_stage": 3, "num_epochs": 2,
              "batch_size_training": 16, "lr": 1e-3, "max_new_tokens": 30, "train_path": str(train), "val_path": str(valid),
              "save_path": str(folder / "runs"), "name": "fsdp", "parallel": "fsdp", "bf16": device == "cuda",
              "model_config": {"arch": "llama", "n_layer": 2, "n_embd": 128, "n_head": 4, "max_positions": 256}}
    path = folder / "fsdp.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "noblankslate.cli"]
    result = _run([*torchrun, "train", str(path)], timeout)
    metrics = folder / "runs" / "fsdp" / "metrics.jsonl"
    if metrics.is_file():
        epochs = [json.loads(line) for line in metrics.read_text().splitlines() if '"event": "epoch"' in line]
        result["epochs"] = [{"epoch": e["epoch"], "train_loss": e["train_loss"], "accuracy": e["accuracy"]} for e in epochs]
    result["ok"] = result.get("returncode") == 0
    return result


def check_gpt2_small(device: str, folder: Path, steps: int, quick: bool) -> dict:
    import torch

    from noblankslate.config import load_config
    from noblankslate.data.curriculum import training_view
    from noblankslate.data.prosqa import generate_prosqa
    from noblankslate.eval.setup import setup_run

    examples = generate_prosqa(64 if quick else 512, seed=0)
    valid = generate_prosqa(8, seed=1, exclude_questions={e["question"] for e in examples})
    (folder / "prosqa_train.json").write_text(json.dumps(examples))
    (folder / "prosqa_valid.json").write_text(json.dumps(valid))
    overrides = [f"train_path={folder / 'prosqa_train.json'}", f"val_path={folder / 'prosqa_valid.json'}",
                 f"save_path={folder / 'runs'}", "bf16=" + ("true" if device == "cuda" else "false")]
    if quick:
        overrides += ["model_config.n_layer=2", "model_config.n_embd=64", "model_config.n_head=2"]
    config = load_config(ROOT / "args" / "prosqa_coconut_generated.yaml", overrides)
    setup = setup_run(config)
    model = setup.model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    result = {"shape": f"{config.model_config.n_layer}x{config.model_config.n_embd}", "batch": config.batch_size_training}
    for label, stage in (("stage 0 (CoT)", 0), ("final stage (6 thoughts)", config.max_latent_stage + 1)):
        view = training_view(setup.train_tokens, stage, setup.spec, 0, 0)
        batches = [setup.collate(view[i : i + config.batch_size_training]) for i in range(0, len(view), config.batch_size_training)]
        timed = []
        for i in range(steps + 2):
            batch = {k: v.to(device) for k, v in batches[i % len(batches)].items() if k != "idx"}
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(**batch, return_logits=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                timed.append(time.perf_counter() - began)
        per_step = sum(timed) / len(timed)
        result[label] = {"seconds_per_step": per_step, "epoch_minutes_for_17886": per_step * (17886 / 32) / 60,
                         "loss": float(loss)}
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def check_table1(folder: Path, timeout: float, quick: bool) -> dict:
    train, valid = _tiny_task(folder, 200 if quick else 20000, 50 if quick else 500)
    overrides = [f"train_path={train}", f"val_path={valid}", "model_config.n_layer=4", "model_config.n_embd=256",
                 "model_config.n_head=8"]
    if quick:
        overrides += ["num_epochs=2", "epochs_per_stage=1", "model_config.n_layer=1", "model_config.n_embd=32",
                      "model_config.n_head=2"]
    result = _run([sys.executable, "-m", "noblankslate.cli", "experiment", str(ROOT / "args" / "table1_cpu.yaml"),
                   *overrides, "--rows", "no_cot,cot,coconut", "--out", str(folder / "table1"), "--parallel", "3"],
                  timeout)
    table = folder / "table1" / "table.md"
    result["table"] = table.read_text() if table.is_file() else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (to test this script on a CPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per stage in gpt2_small_epoch")
    parser.add_argument("--skip", action="append", default=[], help="a check to leave out (repeatable)")
    parser.add_argument("--table1-seconds", type=float, default=200, help="budget of the table1_balanced check")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device}
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    checks = {
        "env": lambda: check_env(args.device),
        "bf16_autocast": lambda: check_bf16(args.device),
        "fsdp_nccl": lambda: check_fsdp(args.device, folder / "fsdp", 300),
        "bench_coconut": lambda: _run([sys.executable, str(ROOT / "bench" / "bench_coconut.py"), "--device", args.device,
                                       "--quick", *([] if args.device == "cuda" else ["--skip", "train"])], 300),
        "gpt2_small_epoch": lambda: check_gpt2_small(args.device, folder / "gpt2", 2 if args.quick else args.steps, args.quick),
        "table1_balanced": lambda: check_table1(folder / "t1", args.table1_seconds, args.quick),
    }
    for sub in ("fsdp", "gpt2", "t1"):
        (folder / sub).mkdir()
    for name, check in checks.items():
        if name in args.skip:
            continue
        began = time.perf_counter()
        try:
            report[name] = check()
        except Exception:  # noqa: BLE001 - a failed check is reported, the others still run
            report[name] = {"error": traceback.format_exc()[-3000:]}
        report[name]["check_seconds"] = time.perf_counter() - began
        print(f"{name}: {json.dumps(report[name])[:300]}", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
