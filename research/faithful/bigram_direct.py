"""RMS of shipped token rows (30_bigram_tokens.toml) vs RMS of the current token's direct path (embedding minus
its mean -> LNf at the typical scale -> W_U, centred over the vocabulary) on the row's written tokens."""
import tomllib, numpy as np, torch
from reference.oracle import Oracle
from verify.discover.common import sample_windows, typical_ln_scale
o = Oracle.load("reference/default")
m = o.model
w = sample_windows(o, "../shared/corpus/tinystories/train.txt", 4096, window=256)
s = typical_ln_scale(o, w)
cnt = np.bincount(w.ravel(), minlength=o.cfg.vocab_size).astype(np.float64)
with torch.no_grad():
    E = m.W_E.double()
    mean = (torch.from_numpy(cnt / cnt.sum())[:, None] * E).sum(0)
    d = E - mean
    d = d - d.mean(1, keepdim=True)
    lg = ((d * m.ln_final.weight.double() / s) @ m.W_U.double()).numpy()
lg -= lg.mean(1, keepdims=True)
voc = {t: i for i, t in enumerate(o.vocab)}
rows = tomllib.loads(open("rules/30_bigram_tokens.toml").read())["bigram"]
ratio = []
for r in rows:
    if r.get("now") not in voc:
        continue
    c = voc[r["now"]]
    toks = [voc[t] for t in r["next"]]
    vals = np.array(list(r["next"].values()))
    ratio.append(np.sqrt((lg[c, toks] ** 2).mean()) / np.sqrt((vals ** 2).mean()))
ratio = np.array(ratio)
print(f"{len(ratio)} token rows: RMS(direct path) / RMS(row) median {np.median(ratio):.3f}, quartiles {np.percentile(ratio,25):.3f} {np.percentile(ratio,75):.3f}; typical LNf scale {s:.3f}")
