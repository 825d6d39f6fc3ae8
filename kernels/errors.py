"""The error frmap raises for a person to fix beside bad input (ValueError) and files that cannot
be read or written (OSError)."""


class FrmapError(RuntimeError):
    """What this install, machine or cluster lacks (a backend, an optional package, a cluster at
    an address), or work left unfinished. The `frmap` command prints it as one line; any other
    RuntimeError is a bug, frmap's or a library's, and keeps its traceback."""


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says memory ran out: MemoryError, torch's (CUDA) OutOfMemoryError or its
    CPU allocator's RuntimeError."""
    text = str(err)
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text)
