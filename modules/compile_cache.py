"""Where torch.compile keeps what it compiled, so that the next run of the same shapes starts in seconds.

Inductor caches compiled graphs and kernels (FX graph cache, AOTAutograd cache, Triton kernels) on disk and reuses
them in any later process that compiles the same graphs; only tracing is redone. Its default directory is
/tmp/torchinductor_<user>, which is lost when /tmp is cleared (reboots, fresh containers), so we keep it under the
user's cache directory instead. A TORCHINDUCTOR_CACHE_DIR of the user's own wins.
"""

import os


def use_compile_cache() -> str:
    """Point TORCHINDUCTOR_CACHE_DIR at $XDG_CACHE_HOME/openchatkit/torchinductor (~/.cache/...) unless it is set
    or that directory cannot be made (then inductor's default stays); returns the directory in use."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "openchatkit", "torchinductor")
        try:
            os.makedirs(path, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        except OSError:  # a read-only home: inductor's /tmp default still works
            return "inductor's default (/tmp/torchinductor_<user>)"
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]
