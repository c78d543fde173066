"""Claims: every rule is a falsifiable claim about the reference (`handmodel check-rules`); see docs/claims.md."""
from .runner import (CHECK_KEYS, DEFAULT_EXAMPLES, MAX_PREFIX, CannotCheck, Checker, Claim, NoClaim, Outcome, Plan, Pool,
                     RuleResult, context_pool, kl_last, no_local_constants, one_thread, parse_claim, read_checks,
                     unigram_logp)

__all__ = ["CHECK_KEYS", "DEFAULT_EXAMPLES", "MAX_PREFIX", "CannotCheck", "Checker", "Claim", "NoClaim", "Outcome", "Plan",
           "Pool", "RuleResult", "context_pool", "kl_last", "no_local_constants", "one_thread", "parse_claim",
           "read_checks", "unigram_logp"]
