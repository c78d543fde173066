"""The oracle API: what the rest of the project asks of the reference model.

    o = Oracle.load()                       # shipped model (or Oracle.load("runs/x"))
    o.log_probs([ids, ids2])                # next-token log-probs, one [T, V] float32 array per sequence
    o.run_with_cache(ids)                   # every hook of model.HOOKS as numpy arrays
    o.direct_path()                         # [V, V] token -> next-token logits, attention removed (MLP kept)
    o.qk(h).rows([dst])                     # attention scores (dst token, src token), factored
    o.ov(h).rows([src])                     # logit effect of attending to src, factored

Path helpers evaluate the token-only residual x0 = E[tok] + P[pos]; with pos=None they use the mean
position embedding (what a token looks like "on average"). They are exact forward passes of the
model on that residual, so the tests compare them against the full model on small cases.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from handmodel.errors import UserError
from handmodel.vocab import load_vocab

from .checkpoint import DEFAULT_DIR, checkpoint_hash, load_checkpoint
from .corpus import EOT
from .model import OneLayerTransformer
from .tokenizer import load_tokenizer


@dataclass
class Factored:
    """A matrix kept as left @ right (TransformerLens's FactoredMatrix idea): [n, k] @ [k, m].

    Rows, columns and top entries are computed on demand; `full()` builds the dense [n, m] only when asked.
    """
    left: np.ndarray  # [n, k]
    right: np.ndarray  # [k, m]

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    def rows(self, idx) -> np.ndarray:
        return self.left[np.asarray(idx)] @ self.right  # [len(idx), m]

    def cols(self, idx) -> np.ndarray:
        return self.left @ self.right[:, np.asarray(idx)]  # [n, len(idx)]

    def full(self) -> np.ndarray:
        return self.left @ self.right

    def top_entries(self, k: int, chunk: int = 512, largest: bool = True) -> list[tuple[int, int, float]]:
        """The k largest (or smallest) entries as (row, col, value), scanning `chunk` rows at a time."""
        sign = 1.0 if largest else -1.0
        best: list[tuple[float, int, int]] = []
        for s in range(0, self.shape[0], chunk):
            block = sign * self.rows(np.arange(s, min(s + chunk, self.shape[0])))
            flat = np.argpartition(block.ravel(), -min(k, block.size))[-k:]
            r, c = np.unravel_index(flat, block.shape)
            best += [(float(block[i, j]), s + int(i), int(j)) for i, j in zip(r, c)]
            best = sorted(best, reverse=True)[:k]
        return [(r, c, sign * v) for v, r, c in best]


class Oracle:
    def __init__(self, model: OneLayerTransformer, card: dict, path: Path):
        self.model = model
        self.card = card
        self.path = path
        self.cfg = model.cfg
        self.tokenizer = load_tokenizer(path / "tokenizer.json")
        self.vocab = load_vocab(path / "tokenizer.json")
        self.eot = self.tokenizer.token_to_id(EOT)
        self._hash: str | None = None

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Oracle":
        path = Path(path) if path is not None else DEFAULT_DIR
        model, card = load_checkpoint(path)
        return cls(model, card, path)

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = checkpoint_hash(self.path)
        return self._hash

    # -- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # -- validation ----------------------------------------------------------------------------
    def _check(self, ids) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim != 1 or a.size == 0:
            raise UserError(f"a token sequence must be a non-empty 1-D list of ids (got shape {a.shape})")
        if not np.issubdtype(a.dtype, np.integer):
            raise UserError(f"token ids must be integers (got {a.dtype})")
        if a.min() < 0 or a.max() >= self.cfg.vocab_size:
            bad = int(a[(a < 0) | (a >= self.cfg.vocab_size)][0])
            raise UserError(f"token id {bad} is out of range: this model's vocabulary has ids 0..{self.cfg.vocab_size - 1}")
        if len(a) > self.cfg.n_ctx:
            raise UserError(f"sequence of {len(a)} tokens is longer than the context ({self.cfg.n_ctx}); "
                            "split it (verify does this for you) or pass a shorter one")
        return a.astype(np.int64)

    # -- forward passes ------------------------------------------------------------------------
    @torch.inference_mode()
    def log_probs(self, seqs, batch_tokens: int = 8192) -> list[np.ndarray]:
        """Next-token log-probs for each sequence: list of [T_i, V] float32. Sequences are batched by
        length (padding sits after each sequence, so causal masking keeps it from changing anything)."""
        if isinstance(seqs, np.ndarray) and seqs.ndim == 1:
            seqs = [seqs]
        arrs = [self._check(s) for s in seqs]
        out: list[np.ndarray | None] = [None] * len(arrs)
        order = sorted(range(len(arrs)), key=lambda i: len(arrs[i]))
        i = 0
        while i < len(order):
            T = len(arrs[order[i]])
            j = i + 1
            while j < len(order) and len(arrs[order[j]]) * (j - i + 1) <= batch_tokens:
                j += 1
            group = order[i:j]
            T = max(len(arrs[g]) for g in group)
            batch = torch.zeros(len(group), T, dtype=torch.int64)
            for r, g in enumerate(group):
                batch[r, : len(arrs[g])] = torch.from_numpy(arrs[g])
            lp = F.log_softmax(self.model(batch).float(), dim=-1).numpy()
            for r, g in enumerate(group):
                out[g] = lp[r, : len(arrs[g])]
            i = j
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def run_with_cache(self, ids) -> dict[str, np.ndarray]:
        """One sequence [T] (or a batch [B, T]) -> {hook name: array}, batch dim kept as given."""
        a = np.asarray(ids)
        batch = np.stack([self._check(r) for r in a]) if a.ndim == 2 else self._check(a)[None]
        cache: dict = {}
        self.model(torch.from_numpy(batch), cache=cache)
        res = {k: v.numpy() for k, v in cache.items()}
        return res if a.ndim == 2 else {k: v[0] for k, v in res.items()}

    # -- path helpers --------------------------------------------------------------------------
    def _x0(self, tokens=None, pos=None) -> torch.Tensor:
        m = self.model
        toks = torch.arange(self.cfg.vocab_size) if tokens is None else torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
        p = m.W_pos.mean(0) if pos is None else m.W_pos[int(pos)]
        return m.W_E[toks] + p  # [n, D]

    @torch.inference_mode()
    def direct_path(self, tokens=None, pos=None) -> np.ndarray:
        """[n, V] logits from a token alone with attention removed: U·LNf(x0 + MLP(x0))."""
        m = self.model
        x0 = self._x0(tokens, pos)
        return m.unembed(x0 + m.mlp(x0)).numpy()

    @torch.inference_mode()
    def qk(self, head: int, dst_pos=None, src_pos=None) -> Factored:
        """Attention score of (destination token, source token) for `head`: [V_dst, V_src], factored."""
        self._check_head(head)
        m = self.model
        q, _, _ = m.attn_qkv(m.ln1(self._x0(None, dst_pos)))
        _, k, _ = m.attn_qkv(m.ln1(self._x0(None, src_pos)))
        scale = float(m.attn_scale)  # sqrt(d_head), or 1 for unscaled (GPT-Neo) attention
        return Factored((q[:, head] / scale).numpy(), k[:, head].T.contiguous().numpy())

    @torch.inference_mode()
    def ov(self, head: int, src_pos=None, ln_scale: float = 1.0) -> Factored:
        """Logit effect of `head` attending fully to a source token: [V_src, V_out], factored.

        The head writes v(src)·W_O into the residual; its effect on the logits through LNf is
        U·(γ ⊙ centre(write)) / σ where σ is LNf's scale at that position (pass a typical value as
        `ln_scale`; 1.0 gives the unscaled direct logit attribution).
        """
        self._check_head(head)
        m = self.model
        _, _, v = m.attn_qkv(m.ln1(self._x0(None, src_pos)))
        W_O = m.W_O[head] - m.W_O[head].mean(-1, keepdim=True)  # LNf centres the residual
        right = (W_O * m.ln_final.weight / ln_scale) @ m.W_U  # [Dh, V]
        return Factored(v[:, head].numpy(), right.numpy())

    def ov_write(self, head: int, tokens, src_pos=None) -> np.ndarray:
        """The raw residual write v(src)·W_O of `head` for source tokens: [n, D] (no b_O)."""
        self._check_head(head)
        m = self.model
        with torch.inference_mode():
            _, _, v = m.attn_qkv(m.ln1(self._x0(tokens, src_pos)))
            return (v[:, head] @ m.W_O[head]).numpy()

    def _check_head(self, head: int) -> None:
        if not 0 <= head < self.cfg.n_heads:
            raise UserError(f"head {head} does not exist: this model has heads 0..{self.cfg.n_heads - 1}")

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, prompt: str = "", max_new: int = 100, temperature: float = 1.0, top_k: int = 0,
               seed: int = 0) -> str:
        """Continue `prompt` (the model always sees [EOT] before a story); stops at EOT or the context end."""
        if temperature < 0:
            raise UserError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
        ids = [self.eot] + self.encode(prompt).tolist()
        gen = torch.Generator().manual_seed(seed)
        new: list[int] = []
        for _ in range(max_new):
            if len(ids) >= self.cfg.n_ctx:
                break
            logits = self.model(torch.tensor([ids]))[0, -1].float()
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, len(logits))).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            if nxt == self.eot:
                break
            ids.append(nxt)
            new.append(nxt)
        return prompt + self.decode(new)
