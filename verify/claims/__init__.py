"""Claims: every rule is a falsifiable claim about the reference (`handmodel check-rules`); the spec is
docs/claims.md. runner.py draws the contexts and runs the checks; one module per rule kind holds its claim."""
from .records import (CHECK_KEYS, DEFAULT_EXAMPLES, MAX_PREFIX, CannotCheck, Claim, NoClaim, Outcome, Plan, RuleResult,
                      kl_last, parse_claim, read_checks)
from .runner import PLANS, Checker, context_pool, no_local_constants, one_thread, unigram_logp
from .targets import Pool

__all__ = ["CHECK_KEYS", "DEFAULT_EXAMPLES", "MAX_PREFIX", "PLANS", "CannotCheck", "Checker", "Claim", "NoClaim", "Outcome",
           "Plan", "Pool", "RuleResult", "context_pool", "kl_last", "no_local_constants", "one_thread", "parse_claim",
           "read_checks", "unigram_logp"]
