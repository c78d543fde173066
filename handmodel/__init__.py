"""The hand model: a next-token model built only from human-written rule files and a vocabulary.

Never imports torch or the reference model; see docs/rules.md for the rule language.
"""
from .compiled import CompiledRules, load_rules, vocab_fingerprint
from .engine import HandModel
from .errors import UserError
from .vocab import load_vocab

__all__ = ["load_rules", "HandModel", "CompiledRules", "UserError", "load_vocab", "vocab_fingerprint"]
