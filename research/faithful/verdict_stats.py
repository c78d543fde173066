"""Median statistic per (kind, check) and pass counts, from the check-components verdict cache of each draft."""
import json, glob, collections, os, sys
import numpy as np
rows = {}
for f in glob.glob('/root/.cache/handmodel/claims/*.json'):
    d = json.load(open(f))
    name = os.path.basename(str(d.get('rules')))
    if name.startswith('faithful-') and d['contexts'].get('windows') == 24:
        rows[name] = d
keys = [('head', 'readout'), ('head', 'intervention'), ('head_out', 'readout'), ('head_out', 'intervention'),
        ('head_out', 'readout.copy'), ('neuron', 'readout'), ('neuron', 'intervention'), ('bigram', 'readout'),
        ('bigram', 'intervention'), ('prior', 'readout')]
print('| draft | ' + ' | '.join(f'{k}.{c}' for k, c in keys) + ' |')
for name in sys.argv[1:]:
    d = rows[name]
    st = collections.defaultdict(list)
    for v in d['verdicts']:
        for ch in v['checks']:
            st[(v['kind'], ch['name'])].append((ch['verdict'], ch['value']))
    cells = []
    for k in keys:
        x = st.get(k, [])
        vals = [b for _, b in x if b is not None]
        cells.append(f"{np.median(vals):.3f} ({sum(a == 'pass' for a, _ in x)}/{len(x)})" if x else '-')
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
