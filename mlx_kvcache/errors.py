class UserError(Exception):
    """A problem with what the user asked for (a path, a flag, a prompt).

    The CLI prints it as one line and exits non-zero; anything else that is
    raised is a bug and keeps its traceback.
    """
