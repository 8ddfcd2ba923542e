"""Log backends (--train-log-backend print|loguru|wandb|tensorboard, combinable: print,tensorboard).

Only the logging rank creates a logger; other ranks get Silent. A logger is one text output (print or loguru) plus
metric sinks (wandb, tensorboard, the --metrics-file JSON lines), all fed the same values per step.
"""

import json
import os
import sys
import time

from config import LogConfig, parse_backends
from utils.errors import UserError


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


class LoggingError(UserError, RuntimeError):
    """A log backend that cannot start: the message says how to fix it."""


class WandbSink:
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
        self.wandb.log(values, step=step)

    def close(self):
        self.run.finish()


class TensorBoardSink:
    """One SummaryWriter per job: every numeric metric as a scalar under its own name (the names wandb gets); a
    per-rank list such as mem_gb_per_rank as `name/<rank>`. The settings are stored once as text. The writer (and
    its folder) is made at the first record, so a start that fails leaves nothing behind; a resumed run hides the
    events the interrupted run wrote after its last checkpoint (TensorBoard's purge_step)."""

    def __init__(self, log_dir, config):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LoggingError("--train-log-backend tensorboard needs tensorboard: pip install tensorboard") from None
        self.make_writer, self.log_dir, self.config = SummaryWriter, log_dir, config
        self.writer, self.purge_step = None, None

    def resume_at(self, step):
        self.purge_step = step + 1

    def _writer(self):
        if self.writer is None:
            try:
                self.writer = self.make_writer(log_dir=self.log_dir, purge_step=self.purge_step)
            except OSError as exc:
                raise LoggingError(
                    f"--tensorboard-dir {self.log_dir}: cannot write there ({exc.strerror}); give a writable directory"
                ) from None
            text = json.dumps(self.config, indent=2, sort_keys=True).replace("\n", "\n    ")
            self.writer.add_text("config", "    " + text)
        return self.writer

    def metrics(self, step, values):
        writer = self._writer()
        for name, value in values.items():
            if isinstance(value, (list, tuple)):
                for rank, item in enumerate(value):
                    if _is_number(item):
                        writer.add_scalar(f"{name}/{rank}", item, step)
            elif _is_number(value):
                writer.add_scalar(name, value, step)
        writer.flush()  # a crash loses at most the step being written

    def close(self):
        if self.writer is not None:
            self.writer.close()


class JsonlSink:
    """Appends every metrics record to a JSON-lines file (benchmarks and tools/plot_metrics.py read it). The file
    is opened at the first record, so a start that fails leaves nothing behind."""

    def __init__(self, path):
        self.path, self.file = path, None

    def metrics(self, step, values):
        if self.file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.file = open(self.path, "a")
        self.file.write(json.dumps(dict(values, step=step)) + "\n")
        self.file.flush()

    def resume_at(self, step):
        """A run resumed after `step`: drop the records of later steps, which the interrupted run wrote after its
        last checkpoint and this run writes again (and a line torn by the crash), so every step appears once."""
        if not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict) or record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def close(self):
        if self.file is not None:
            self.file.close()


class Logger:
    """One text logger (print or loguru) plus metric sinks (wandb, tensorboard, a metrics file)."""

    def __init__(self, text, sinks):
        self.text, self.sinks = text, sinks

    def info(self, message):
        self.text.info(message)

    def metrics(self, step, values):
        self.text.metrics(step, values)
        for sink in self.sinks:
            sink.metrics(step, values)

    def resume_at(self, step):
        for sink in self.sinks:
            if hasattr(sink, "resume_at"):
                sink.resume_at(step)

    # A part of the run's checkpoint (checkpoint/parts.py): its records are its own files; a resumed run cuts them
    # back to the checkpoint's step.
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        self.resume_at(state["step"])

    def record(self, step, values, message):
        """A record that is not a step's metrics (the start-up phases): `message` for the text log, `values` for
        the sinks (a nested dict: the metrics file keeps it whole, wandb flattens it, TensorBoard skips it)."""
        self.text.info(message)
        for sink in self.sinks:
            sink.metrics(step, values)

    def close(self):
        for sink in self.sinks:
            sink.close()
        self.text.close()


class Silent:
    def info(self, message):
        pass

    def metrics(self, step, values):
        pass

    def resume_at(self, step):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def record(self, step, values, message):
        pass

    def close(self):
        pass


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def make_logger(log: LogConfig, is_logger: bool, config: dict):
    """The logger of this process: a comma list of backends (text goes to loguru when listed, else to stdout) and
    the metrics file; `config` (the run's settings) goes to wandb and TensorBoard."""
    if not is_logger:
        return Silent()
    names = parse_backends(log.backend)
    text = LoguruLogger() if "loguru" in names else PrintLogger()
    sinks = []
    if "wandb" in names:
        sinks.append(WandbSink(log.project, log.job_id, config))
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(log.tensorboard_dir, config))
    if log.metrics_file:
        sinks.append(JsonlSink(log.metrics_file))
    return Logger(text, sinks)


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
