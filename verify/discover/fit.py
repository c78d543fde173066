"""`handmodel fit`: calibrate the numbers of hand-written rule files against the reference.

Structure (which tokens, classes, contexts, outputs) is the person's; fit only moves the rules' numbers
(a [[weights]] set's own weights are structure here: the numbers referencing it move, its weights do not), to
minimise the mean over training positions of KL(p_ref ‖ p_hand) (reference first; log-softmax only).
Gradients come from torchrules.py (the documented semantics in torch; tests check it equals the
engine); L-BFGS with a strong-Wolfe line search makes every accepted step lower the KL, so the
reported curve is monotone. Numbers are written back with tomlkit into the same files: comments,
order and formatting stay; a file that fails to load is never touched.
"""
from __future__ import annotations

import difflib
import time

import numpy as np

from handmodel.errors import UserError

from .common import sample_windows


class Objective:
    """Mean KL(p_ref ‖ p_hand) over the positions of `windows`, evaluated in chunks of windows."""

    def __init__(self, tr, ref_logp: np.ndarray, max_elems: int = 1 << 22):
        import torch

        self.tr = tr
        self.ref = torch.as_tensor(ref_logp, dtype=torch.float32)  # [B, T, V]
        B, T, V = self.ref.shape
        p = self.ref.exp()
        self.neg_ent = torch.where(p > 0, p * self.ref, torch.zeros(())).sum(-1)  # Σ p log p  [B, T]
        self.p = p
        self.n = B * T
        self.chunk = max(1, max_elems // (T * V))

    def __call__(self, theta, backward: bool = False) -> float:
        import torch

        total = 0.0
        B = self.ref.shape[0]
        # each chunk backpropagates into a detached copy of theta; the summed gradient then goes once through
        # whatever built theta (a graph two chunks' backward passes cannot both traverse)
        th = theta.detach().requires_grad_(backward)
        for s in range(0, B, self.chunk):
            idx = torch.arange(s, min(B, s + self.chunk))
            logp = torch.log_softmax(self.tr.logits(th, idx).float(), -1)
            kl = (self.neg_ent[idx] - (self.p[idx] * logp).sum(-1)).sum() / self.n
            if backward:
                kl.backward()
            total += float(kl.detach())
        if backward and theta.requires_grad:
            theta.backward(th.grad)
        return total


def check_training_text(corpus) -> None:
    """Refuse held-out text: a file named (or linking to) valid*, or a folder that holds one."""
    from pathlib import Path

    p = Path(corpus)
    names = [p.name, p.resolve().name] if p.is_file() or not p.exists() else \
        [f.name for f in p.glob("*.txt")] + [f.resolve().name for f in p.glob("*.txt")]
    bad = next((n for n in names if "valid" in n), None)
    if bad is not None:
        where = "" if bad == p.name else f" (it holds {bad})"
        raise UserError(f"--train-corpus {corpus}{where}: fit on training text; valid.txt is for reporting "
                        "(never tune on what you report)")


def fit_rules(rules_path, oracle, corpus, tokens: int = 4096, steps: int = 30, only: list[str] | None = None,
              window: int = 128, dry_run: bool = False, progress: bool = True, log=None) -> dict:
    import torch

    from handmodel import load_rules

    check_training_text(corpus)

    from .slots import read_slots, write_back
    from .torchrules import TorchRules

    rules = load_rules(rules_path, oracle.vocab)  # UserError on any syntax/semantic problem: nothing written
    S = read_slots(rules)
    if not S.slots:
        raise UserError(f"{rules_path}: these rules hold no numbers to fit")
    ids = rules.rule_ids
    if only:
        want = [x for o in only for x in o.split(",") if x]
        bad = [w for w in want if w not in ids]
        if bad:
            near = difflib.get_close_matches(bad[0], ids, n=3)
            raise UserError(f"--only {bad[0]!r}: no rule with that id" + (f"; did you mean {', '.join(near)}?" if near else
                                                                         f" (ids: {', '.join(ids[:8])}{', ...' if len(ids) > 8 else ''})"))
        free = S.of_rules([ids.index(w) for w in want])
    else:
        free = np.ones(len(S.slots), dtype=np.bool_)
    if not free.any():
        raise UserError(f"--only {' '.join(only or [])}: those rules hold no numbers (e.g. [[class]] or a head with no scores)")

    windows = sample_windows(oracle, corpus, tokens, window=window)
    ref = np.stack(oracle.log_probs(list(windows)))
    tr = TorchRules(rules, S, windows)
    obj = Objective(tr, ref)
    theta0 = torch.as_tensor(S.values, dtype=torch.float32)
    free_t = torch.as_tensor(free)
    x = theta0[free_t].clone().requires_grad_(True)

    def full(xv):
        th = theta0.clone()
        th[free_t] = xv
        return th

    with torch.no_grad():
        kl0 = obj(full(x))
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, max_eval=25, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        return torch.tensor(obj(full(x), backward=True))

    history = [kl0]
    best = x.detach().clone()
    from rich.progress import BarColumn, Progress, TextColumn

    bar = Progress(TextColumn("[bold]fit"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("KL {task.fields[kl]:.5f} nats/token"), disable=not progress, transient=False)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task("fit", total=steps, kl=kl0)
        for i in range(steps):
            opt.step(closure)
            with torch.no_grad():
                kl = obj(full(x))
            if not np.isfinite(kl) or kl > history[-1]:  # never accept a worse point (history never rises)
                with torch.no_grad():
                    x.copy_(best)
                break
            best = x.detach().clone()
            history.append(kl)
            bar.update(task, completed=i + 1, kl=kl)
            if history[-2] - kl < 1e-7 * max(1.0, kl):
                break
    theta = full(best).detach().numpy().astype(np.float64)
    written = [] if dry_run else write_back(S, theta, free)
    changed = [(rules.rule_ids[s.rule], ".".join(map(str, s.path)), s.value, float(theta[i]))
               for i, s in enumerate(S.slots) if free[i]]
    return {"rules": str(rules_path), "positions": int(windows.size), "numbers_fitted": int(free.sum()),
            "numbers_total": len(S.slots), "kl_before": history[0], "kl_after": history[-1], "history": history,
            "seconds": round(time.perf_counter() - t0, 2), "written": written, "dry_run": dry_run,
            "changes": [{"rule": r, "key": k, "before": b, "after": round(a, 4)} for r, k, b, a in changed]}
