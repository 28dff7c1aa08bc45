"""Run one of the project's scripts with a fault injected, exactly as its `__main__` block runs it:

    python tests/inject_fault.py MODULE.FUNCTION:N SCRIPT.py ARGS...

The N-th call (from 1) of MODULE.FUNCTION, and every call after it, raises `InjectedFault`; an ENOSPC suffix
(`MODULE.FUNCTION:N:ENOSPC`) raises OSError(ENOSPC, "No space left on device") instead, as a full disk does. With
INJECT_FAULT_RANK set, only the process of that RANK fails. The function is replaced wherever a loaded module holds it
under its own name, so a script's `from module import function` sees the fault too. DataLoader workers inherit it.
"""

import errno
import functools
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class InjectedFault(RuntimeError):
    pass


def faulty(function, nth, kind):
    calls = 0

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls >= nth:
            if kind == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            raise InjectedFault(f"injected into {function.__module__}.{function.__name__}, call {calls}")
        return function(*args, **kwargs)

    return wrapper


def inject(spec, script_module):
    target, nth, *kind = spec.split(":")
    module_name, name = target.rsplit(".", 1)
    original = getattr(importlib.import_module(module_name), name)
    replacement = faulty(original, int(nth), kind[0] if kind else None)
    for module in [*list(sys.modules.values()), script_module]:
        if getattr(module, name, None) is original:
            setattr(module, name, replacement)


def main():
    spec, script, *argv = sys.argv[1:]
    sys.argv = [script, *argv]
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    rank = os.environ.get("INJECT_FAULT_RANK")
    if rank is None or rank == os.environ.get("RANK", "0"):
        inject(spec, module)
    from cosmos_process import (
        run_main,
    )

    run_main(module.main, module.parse_args)


if __name__ == "__main__":
    main()
