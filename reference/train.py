"""`handmodel train`: AdamW, warmup + cosine, clipping, periodic eval, checkpoints, resume, DDP.

Determinism: the weights start from torch.manual_seed(seed) and the batch of step s is drawn from
np.random.default_rng([seed, s]) -- so a resumed run sees exactly the batches the uninterrupted
run would have, and the same command gives the same model. Under `torchrun` (WORLD_SIZE > 1) every
rank draws the same global batch and trains on its own slice; DDP averages the gradients, which
equals the single-process gradient of the whole batch.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from handmodel.errors import UserError

from .checkpoint import save_checkpoint
from .corpus import resolve_corpus, token_stream
from .model import ModelConfig, OneLayerTransformer
from .tokenizer import load_tokenizer, train_tokenizer


@dataclass
class TrainConfig:
    corpus: str = "../shared/corpus/tinystories/train.txt"
    valid: str | None = None  # default: valid.txt next to the corpus file, if present
    out: str = "runs/default"
    tokenizer: str | None = None  # existing tokenizer.json; default: train one on the corpus
    vocab_size: int = 4096
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 2000
    batch_size: int = 16  # global batch, sequences of model.n_ctx tokens
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_tokens: int = 65536
    ckpt_every: int = 500
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def batch_at(stream: np.ndarray, step: int, cfg: TrainConfig) -> np.ndarray:
    """Global batch of step `step`: [batch_size, n_ctx + 1] windows of the stream (inputs + targets)."""
    T = cfg.model.n_ctx
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(stream) - T - 1, size=cfg.batch_size)
    return np.stack([stream[s : s + T + 1] for s in starts]).astype(np.int64)


@torch.no_grad()
def evaluate(model: OneLayerTransformer, stream: np.ndarray, n_ctx: int, max_tokens: int, device: str) -> float:
    """Mean next-token cross-entropy over consecutive non-overlapping windows (deterministic)."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, min(len(stream) - 1, max_tokens), n_ctx):
        chunk = torch.from_numpy(stream[s : s + n_ctx + 1].astype(np.int64)).to(device)
        if len(chunk) < 2:
            break
        logits = model(chunk[None, :-1])
        total += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    model.train()
    return total / max(count, 1)


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train(cfg: TrainConfig, *, resume: bool = True, progress: bool = True, log=print) -> dict:
    """Train (or resume) into cfg.out. Returns the model card."""
    rank, world = _dist_info()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes; pick a multiple")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: no CUDA GPU is visible; use --device cpu")
    device = cfg.device
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)

    out = Path(cfg.out)
    stories = resolve_corpus(cfg.corpus, "train")
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    elif resume and (out / "tokenizer.json").exists():
        tok = load_tokenizer(out / "tokenizer.json")
    else:
        tok = train_tokenizer(stories, cfg.vocab_size)
    if tok.get_vocab_size() != cfg.model.vocab_size:
        cfg.model.vocab_size = tok.get_vocab_size()
    stream = token_stream(tok, stories)
    if len(stream) < cfg.model.n_ctx + 2:
        raise UserError(f"{cfg.corpus}: only {len(stream)} tokens; training needs more than n_ctx={cfg.model.n_ctx}")
    valid_path = cfg.valid
    if valid_path is None and cfg.corpus != "tinystories":
        cand = Path(cfg.corpus).with_name("valid.txt")
        valid_path = str(cand) if cand.exists() and cand != Path(cfg.corpus) else None
    vstream = None
    if cfg.corpus == "tinystories" and valid_path is None:
        vstream = token_stream(tok, resolve_corpus("tinystories", "valid"))
    elif valid_path:
        vstream = token_stream(tok, resolve_corpus(valid_path, "valid"))

    torch.manual_seed(cfg.seed)
    model = OneLayerTransformer(cfg.model).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    step, history = 0, []
    state_path = out / "train_state.pt"
    if resume and state_path.exists():
        try:  # weights_only: tensors and plain containers only, never code (it may come from anywhere)
            st = torch.load(state_path, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 -- damaged, or holds objects a safe load refuses
            raise UserError(f"{state_path}: cannot be read as a training state ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100]}); pass --no-resume to start over") from None
        if not isinstance(st, dict) or not {"config", "model", "opt", "step", "history"} <= set(st):
            raise UserError(f"{state_path}: not a training state saved by `handmodel train`; pass --no-resume to start over")
        if st["config"] != _cfg_key(cfg):
            raise UserError(f"{out}: holds a run with different settings; pass a new --out or --no-resume to overwrite")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, history = st["step"], st["history"]
        if rank == 0:
            log(f"resuming {out} at step {step}")
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model)

    per_rank = cfg.batch_size // world
    tokens_per_step = cfg.batch_size * cfg.model.n_ctx
    losses: list[float] = []

    def checkpoint(final: bool) -> dict:
        card = _card(cfg, step, tokens_per_step, history, model, vstream, stream, device, final)
        if rank == 0:
            save_checkpoint(model, out, tok.to_str(), card)
            tmp = out / "train_state.pt.tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "history": history, "config": _cfg_key(cfg)}, tmp)
            tmp.replace(state_path)
        return card

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                   TimeRemainingColumn(), disable=not (progress and rank == 0))
    card: dict = {}
    with bar:
        task = bar.add_task("train", total=cfg.steps, completed=step, loss=float("nan"), tps=0.0)
        t0 = time.perf_counter()
        while step < cfg.steps:
            batch = torch.from_numpy(batch_at(stream, step, cfg)[rank * per_rank : (rank + 1) * per_rank]).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            logits = ddp_model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            losses.append(_global_mean(loss.item(), world))
            dt = time.perf_counter() - t0
            bar.update(task, completed=step, loss=losses[-1], tps=tokens_per_step * len(losses) / max(dt, 1e-9))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec = {"step": step, "train_loss": float(np.mean(losses[-cfg.eval_every:]))}
                if vstream is not None:
                    rec["valid_loss"] = evaluate(model, vstream, cfg.model.n_ctx, cfg.eval_tokens, device)
                history.append(rec)
                if rank == 0 and not progress:
                    log(json.dumps(rec))
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                card = checkpoint(step == cfg.steps)
    if not card:  # resumed a finished run
        card = json.loads((out / "card.json").read_text())
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return card


def _global_mean(x: float, world: int) -> float:
    if world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x])
    dist.all_reduce(t)
    return t.item() / world


def _cfg_key(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("out"), d.pop("device"), d.pop("threads")  # may change between an interrupted run and its resume
    d.pop("eval_every"), d.pop("ckpt_every")
    return d


def _command_line() -> str:
    """How this run was started, for the model card (argv of the console script or of torchrun's worker)."""
    import shlex
    import sys

    prog = Path(sys.argv[0]).name if sys.argv else "handmodel"
    prog = "handmodel" if prog in ("handmodel", "cli.py", "__main__.py") else prog
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


def _card(cfg, step, tokens_per_step, history, model, vstream, stream, device, final) -> dict:
    last = history[-1] if history else {}
    card = {
        "data": str(cfg.corpus),
        "train_tokens": int(len(stream)),
        "valid_tokens": int(len(vstream)) if vstream is not None else 0,
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "train_loss": round(last.get("train_loss", float("nan")), 4),
        "valid_loss": round(last.get("valid_loss", float("nan")), 4),
        "params": model.n_params(),
        "model": cfg.model.to_dict(),
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("model", "out")},
        "command": _command_line(),
        "finished": final,
    }
    if final and vstream is not None:
        card["valid_loss_full"] = round(evaluate(model, vstream, cfg.model.n_ctx, len(vstream), device), 4)
    return card
