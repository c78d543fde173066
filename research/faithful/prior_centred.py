"""The prior readout (pooled cosine of the prior's logits with log p_ref − mean_v log p_ref, valid.txt windows of 128)
for each draft's prior as written and centred (the same distribution: the prior writes every token)."""
import sys, tomllib, numpy as np, torch
from reference.oracle import Oracle
from reference.corpus import token_stream
from verify.discover.common import read_sample
o = Oracle.load("reference/default")
stream = token_stream(o.tokenizer, read_sample("../shared/corpus/tinystories/valid.txt", 200_000))
W = stream[: 24 * 128].reshape(24, 128).astype(np.int64)
with torch.no_grad():
    lp = torch.log_softmax(o.model(torch.from_numpy(W)).float(), -1).reshape(-1, o.cfg.vocab_size).double().numpy()
y = lp - lp.mean(1, keepdims=True)
voc = {t: i for i, t in enumerate(o.vocab)}
for name in sys.argv[1:]:
    p = tomllib.loads(open(f"drafts/{name}/00_prior.toml").read())["prior"][0]["next"]
    x = np.zeros(o.cfg.vocab_size)
    for t, w in p.items():
        t = t[1:] if t.startswith("@@") else t
        x[voc[t]] = w
    for label, v in (("as written", x), ("centred", x - x.mean())):
        cos = (y @ v).sum() / np.sqrt(len(y) * (v ** 2).sum() * (y ** 2).sum())
        print(f"{name} prior {label}: pooled cosine {cos:.3f}")
