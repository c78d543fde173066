"""Rule discovery: `handmodel inspect`, `suggest` and `fit`.

These tools READ the reference (torch) and WRITE ordinary rule files; the hand model only ever sees the
rule files. They live in verify/ because verify is the one package allowed to import both sides.
Every module here imports torch lazily through reference/, so `handmodel --help` stays fast.
"""
