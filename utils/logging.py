"""Log backends (--train-log-backend print|loguru|wandb). Only the logging rank creates one; others get Silent."""

import json
import os
import sys
import time


class PrintLogger:
    def info(self, message):
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    def metrics(self, step, values):
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        self.info(f"step {step} {shown}")

    def close(self):
        pass


class LoguruLogger(PrintLogger):
    def __init__(self):
        from loguru import logger

        self.logger = logger

    def info(self, message):
        self.logger.info(message)


class LoggingError(RuntimeError):
    """A log backend that cannot start: the message says how to fix it."""


class WandbLogger(PrintLogger):
    """One wandb run per job (only the logging rank creates it). WANDB_NAME names the run; WANDB_MODE=offline
    works without network."""

    def __init__(self, project, job_id, config):
        try:
            import wandb
        except ImportError:
            raise LoggingError("--train-log-backend wandb needs wandb: pip install wandb") from None
        self.wandb = wandb
        try:
            self.run = wandb.init(project=project, name=os.environ.get("WANDB_NAME") or f"job-{job_id}", config=config)
        except Exception as exc:  # noqa: BLE001 - wandb raises its own types (no key, no network, bad project)
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            raise LoggingError(
                f"--train-log-backend wandb: wandb could not start a run ({type(exc).__name__}: "
                f"{first_line}); log in (wandb login, or WANDB_API_KEY) or run with "
                f"WANDB_MODE=offline"
            ) from None

    def metrics(self, step, values):
        super().metrics(step, values)
        self.wandb.log(values, step=step)

    def close(self):
        self.run.finish()


class JsonlMetrics:
    """Wraps a logger and appends every metrics record to a JSON-lines file (benchmarks read it)."""

    def __init__(self, inner, path):
        self.inner = inner
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a")

    def info(self, message):
        self.inner.info(message)

    def metrics(self, step, values):
        self.inner.metrics(step, values)
        self.file.write(json.dumps(dict(values, step=step)) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()
        self.inner.close()


class Silent:
    def info(self, message):
        pass

    def metrics(self, step, values):
        pass

    def close(self):
        pass


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def make_logger(backend, is_logger, project, job_id, config, metrics_file=None):
    if not is_logger:
        return Silent()
    if backend == "loguru":
        logger = LoguruLogger()
    elif backend == "wandb":
        logger = WandbLogger(project, job_id, config)
    else:
        logger = PrintLogger()
    return JsonlMetrics(logger, metrics_file) if metrics_file else logger


def public_flags(args):
    """Flags as JSON-safe values, for wandb config and checkpoint metadata (no secrets live in flags)."""
    return json.loads(json.dumps(vars(args), default=str))


def one_line(text):
    """`text` (an exception, say) with its line breaks and runs of spaces folded: error lines stay one line."""
    return " ".join(str(text).split())


def error_line(message):
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    _record_for_torchrun(message)


def _record_for_torchrun(message):
    """Under torchrun (or the entrypoint's launcher mode) also write the first error line of this process into the
    error file torch.distributed.elastic reads, so its failure report names the cause, not a link to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):  # the first line is the cause; later ones are consequences
        return
    try:
        with open(path, "w") as f:
            # the layout torch's own @record writes (torchrun then fills in the exit code), minus the traceback
            # ("time": torch keeps whole seconds; the launcher mode orders the ranks' failures by it)
            info = {"timestamp": str(int(time.time())), "time": repr(time.time())}
            json.dump({"message": {"message": message, "extraInfo": info}}, f)
    except OSError:  # the report falls back to the exit code; the line is on stderr anyway
        pass
