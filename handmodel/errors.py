"""The one error type users see. The CLI prints its message on one line and exits 2: no traceback.

Every raise site says what is wrong and what to do about it (and, for rule files, where).
"""


class UserError(Exception):
    """Bad input from the user: a file, a flag, a rule. The message is the whole report."""
