"""The one base class of errors whose message is the whole story.

A UserError is raised for bad input (flags, files, data, checkpoints, a layout that does not fit): its message names
the thing and the fix, and the entrypoint prints it as one `error:` line and exits 2, with no traceback. Each room
keeps its own subclass, so a message can be traced to the room that raised it.
"""


class UserError(Exception):
    """Bad input; the message names the flag, file or value and says what to change."""
