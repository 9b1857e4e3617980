"""Run RULER's reference data generators in one process: ``python run_reference.py JOBS.json``.

JOBS.json is a list of {"name": ..., "script": path, "argv": [...]}; each job runs the script as ``__main__`` with
that argv, as RULER's ``prepare.py`` runs it in a subprocess, so that transformers and the tokenizer are imported
once per process. Put this folder first on PYTHONPATH (for the nltk stand-in). Without SciPy, a stand-in
``scipy.special.zeta`` (the only SciPy function RULER's freq_words_extraction.py uses) is installed after
transformers is imported, so that transformers does not take it for the real package.

Speed: niah.py builds, deduplicates and sorts a 6.2M-entry adjective-noun list every run (about 8 s). The scripts
run with ``set`` and ``sorted`` wrapped so that a call on a large list equal to the previous call's returns the
previous result: the same values, computed once per process instead of once per NIAH configuration.
"""

import contextlib
import io
import json
import math
import os
import runpy
import sys
import time
import types


def _zeta(s, q=None):
    """Riemann zeta for s > 1: partial sum plus Euler-Maclaurin tail."""
    s, n = float(s), 1000
    head = math.fsum(k**-s for k in range(1, n))
    return head + n ** (1 - s) / (s - 1) + n**-s / 2 + s * n ** (-s - 1) / 12


class _Memo:
    """``fn`` with the result of its last call on a large list kept, and returned for an equal list."""

    def __init__(self, fn) -> None:
        self.fn, self.last = fn, None

    def __call__(self, *args, **kwargs):
        if kwargs or len(args) != 1 or not isinstance(args[0], list) or len(args[0]) < 100_000:
            return self.fn(*args, **kwargs)
        if self.last is not None and self.last[0] == args[0]:
            return self.last[1]
        result = self.fn(args[0])
        self.last = (list(args[0]), result)
        return result


def _scipy_stand_in() -> None:
    import transformers  # noqa: F401  (first: it records which optional packages exist)

    try:
        import scipy.special  # noqa: F401
    except ImportError:
        scipy = types.ModuleType("scipy")
        special = types.ModuleType("scipy.special")
        special.zeta = _zeta
        scipy.special = special
        sys.modules.update({"scipy": scipy, "scipy.special": special})


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    _scipy_stand_in()
    memo = {"set": _Memo(set), "sorted": _Memo(sorted)}
    for job in jobs:
        script = job["script"]
        t0 = time.time()
        sys.argv = [script, *job["argv"]]
        sys.path[0] = os.path.dirname(script)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(script, init_globals=memo, run_name="__main__")
        print(f"{job.get('name', script)}: {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
