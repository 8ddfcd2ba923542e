"""Command-line flags of dist_lm_pretrain_and_finetune.py.

The flag names and meanings are OpenChatKit's (see the training README); new flags keep its spelling style.
`validate_args` rejects every bad combination that can be found before any process group exists.
"""

import argparse
import importlib.util
import json
import math
import os
import socket

from checkpoint.names import LATEST, step_dir_name
from utils import config as sections
from utils.errors import UserError
from utils.logging import parse_backends

PP_MODES = ("gpipe", "1f1b", "interleaved-1f1b")
# One of these must be in --tokenizer-name: transformers 5 otherwise builds an empty tokenizer without a word.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
OPTIMIZERS = ("adam", "adamw", "8bit-adam")
QUANTIZE_MODES = ("none", "nf4", "int8")
FP8_RECIPES = ("tensorwise", "rowwise")  # modules/fp8.py RECIPES


class ArgumentError(UserError, ValueError):
    """A flag value that cannot work; the message names the flag and the fix."""


def str_to_bool(value):
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        """One line instead of the full usage block (this command has ~60 flags)."""
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser():
    parser = OneLineParser(
        prog="dist_lm_pretrain_and_finetune.py",
        description="Pipeline x data-parallel fine-tuning of GPT-NeoX / GPT-J / Llama causal LMs.",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model-name", required=True, help="Hugging Face model directory or layer-sharded directory")
    model.add_argument("--tokenizer-name", default=None, help="tokenizer directory (default: --model-name)")
    model.add_argument("--model-type", default=None, help="gptneox | gptj | llama (default: config.json's model_type)")
    model.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="transformer layers per pipeline stage (default: derived from the config)",
    )
    model.add_argument("--embedding-dim", type=int, default=None, help="hidden size; checked against the config")
    model.add_argument(
        "--load-pretrained-model",
        type=str_to_bool,
        default=True,
        help="true: load weights from --model-name; false: random init from --seed",
    )
    model.add_argument(
        "--activation-checkpointing",
        choices=("none", "full", "selective"),
        default="none",
        help="recompute blocks in backward: none, full (every block), selective (every other block)",
    )
    model.add_argument(
        "--compile", action="store_true", help="torch.compile each transformer block and the loss (GPU speed)"
    )
    model.add_argument(
        "--attention-backend",
        choices=("auto", "flash", "cudnn", "efficient", "math"),
        default="auto",
        help="scaled-dot-product attention kernel tried first (auto: torch's order)",
    )

    model.add_argument(
        "--attention-mask",
        choices=("document", "causal"),
        default="document",
        help="document: a token sees only earlier tokens of its own packed document, positions restart per "
        "document; causal: every earlier token of the window (OpenChatKit's behaviour)",
    )

    lora = parser.add_argument_group("adapters (LoRA / QLoRA)")
    lora.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0: train every weight (no adapters)")
    lora.add_argument("--lora-alpha", type=float, default=16, help="LoRA scale is alpha / r (peft's rule)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    lora.add_argument(
        "--lora-target-modules",
        default=None,
        help="comma list of HF module names, or all-linear (default: peft's for the family: query_key_value for "
        "GPT-NeoX, q_proj,v_proj for GPT-J and Llama)",
    )
    lora.add_argument(
        "--quantize-base",
        choices=QUANTIZE_MODES,
        default="none",
        help="hold the frozen base of a LoRA run in bitsandbytes 4-bit NF4 (QLoRA) or int8",
    )
    lora.add_argument("--lora-init", default=None, help="a peft adapter directory to start the adapters from")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--task-name",
        default=None,
        help="comma-separated source[:weight]: .jsonl/.jsonl.gz/.parquet/.arrow files, folders of them, "
        "save_to_disk folders, hf:ORG/NAME[@split][#config]",
    )
    data.add_argument("--seq-length", type=int, default=2048)
    data.add_argument("--batch-size", type=int, default=4, help="sequences per data-parallel replica per iteration")
    data.add_argument("--micro-batch-size", type=int, default=1, help="sequences per pipeline micro-batch")
    data.add_argument("--gradient-accumulate-step", type=int, default=1, help="iterations per optimizer step")
    data.add_argument("--train-on-inputs", action="store_true", help="chat records: also train on user turns")
    data.add_argument("--loss-on-bot-only", action="store_true", help="OIG text records: loss on <bot> turns only")
    data.add_argument("--shuffle-buffer", type=int, default=1000, help="records held per task for shuffling")
    data.add_argument("--data-workers", type=int, default=1, help="background tokenisation workers")
    data.add_argument("--evaluation-data", default=None, help="comma-separated eval .jsonl files")
    data.add_argument("--evaluation-steps", type=int, default=0, help="evaluate every N optimizer steps (0: never)")
    data.add_argument("--evaluation-num-batch", type=int, default=None, help="max eval batches (default: all)")
    data.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default="auto",
        help="record layout: auto (detected per record), text (OIG), messages, sharegpt (conversations), alpaca",
    )
    data.add_argument("--text-field", default=None, help="column holding the text of text records (default: text)")
    data.add_argument(
        "--messages-field",
        default=None,
        help="column holding the turns of messages / ShareGPT records (default: messages / conversations)",
    )

    schedule = parser.add_argument_group("schedule")
    schedule.add_argument(
        "--total-steps", type=int, default=None, help="iterations including gradient-accumulation steps"
    )
    schedule.add_argument("--nepochs", type=int, default=None, help="derive --total-steps from the token count")
    schedule.add_argument("--warmup-steps", type=int, default=0)
    schedule.add_argument("--train-warmup-steps", type=int, default=0, help="OpenChatKit flag; only 0 is supported")
    schedule.add_argument("--lr", type=float, default=1e-5)
    schedule.add_argument("--lr-scheduler", choices=("linear", "cosine", "constant"), default="linear")
    schedule.add_argument("--seed", type=int, default=42)

    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="adam and adamw are both AdamW")
    optim.add_argument("--weight-decay", type=float, default=0.01)
    optim.add_argument("--adam-beta1", type=float, default=0.9)
    optim.add_argument("--adam-beta2", type=float, default=0.999)
    optim.add_argument("--adam-eps", type=float, default=1e-6)
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="global clipping norm (0: off)")
    optim.add_argument(
        "--offload-optimizer",
        choices=("none", "cpu"),
        default="none",
        help="cpu: fp32 master weights and AdamW state in host memory, the optimizer step on the CPU",
    )

    precision = parser.add_argument_group("precision")
    precision.add_argument("--fp16", action="store_true", help="fp16 model, fp32 master weights, loss scaling")
    precision.add_argument("--bf16", action="store_true", help="bf16 model, fp32 master weights")
    precision.add_argument(
        "--fp8",
        choices=("none",) + FP8_RECIPES,
        default="none",
        help="train the transformer blocks' large linear layers in float8 through torchao, with one scale per "
        "tensor (tensorwise, fastest) or per row (rowwise); needs --bf16 and a GPU of compute capability 8.9+",
    )
    precision.add_argument("--loss-scale", type=float, default=0, help="> 0: static loss scale; 0: dynamic")
    precision.add_argument("--initial-loss-scale", type=float, default=2**15)
    precision.add_argument("--loss-scale-window", type=int, default=1000)
    precision.add_argument("--hysteresis", type=int, default=2)
    precision.add_argument("--min-loss-scale", type=float, default=1)

    dist = parser.add_argument_group("distributed")
    dist.add_argument("--dist-url", default="tcp://127.0.0.1:7033", help="rendezvous of rank 0 (without torchrun)")
    dist.add_argument("--world-size", type=int, default=None)
    dist.add_argument("--rank", type=int, default=None, help="global rank (without torchrun)")
    dist.add_argument("--cuda-id", type=int, default=None, help="GPU index on this machine (default: LOCAL_RANK)")
    dist.add_argument("--use-cuda", type=str_to_bool, default=True, help="false: train on CPU with gloo")
    dist.add_argument("--pipeline-group-size", type=int, default=1)
    dist.add_argument("--data-group-size", type=int, default=1)
    dist.add_argument("--pp-mode", choices=PP_MODES, default="gpipe")
    dist.add_argument("--virtual-stages", type=int, default=2, help="stages per rank for interleaved-1f1b")
    dist.add_argument(
        "--dp-backend",
        choices=("nccl", "gloo"),
        default="nccl",
        help="on GPUs both move CUDA tensors with NCCL (gloo cannot); gloo adds a gloo group for CPU "
        "tensors. Without GPUs (--use-cuda false) everything runs on gloo",
    )
    dist.add_argument(
        "--dp-mode",
        choices=("allreduce", "sharded"),
        default="allreduce",
        help="sharded: each data-parallel rank keeps 1/dp of every stage's fp32 master weights and optimizer state "
        "(gradients reduce-scattered, weights all-gathered)",
    )
    dist.add_argument(
        "--dp-bucket-mb",
        type=float,
        default=64,
        help="size of the gradient buckets reduced over the data-parallel group while the backward runs: smaller "
        "starts the first reduction sooner, larger launches fewer collectives",
    )
    dist.add_argument("--net-interface", default=None, help="sets GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME when unset")
    dist.add_argument("--dist-timeout", type=float, default=600, help="seconds before a stuck collective aborts")

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-path", default="./model_ckpts/run")
    ckpt.add_argument("--checkpoint-steps", type=int, default=0, help="save every N optimizer steps (0: end only)")
    ckpt.add_argument("--load-checkpoint", type=str_to_bool, default=True, help="resume from <checkpoint-path>/latest")
    ckpt.add_argument(
        "--resume-fallback",
        action="store_true",
        help="if the latest checkpoint is damaged, resume from the newest complete earlier one",
    )
    ckpt.add_argument(
        "--resume-data",
        choices=("exact", "continue", "restart"),
        default="exact",
        help="data stream on resume: exact (refuse changed data files or data flags), continue (go on "
        "at the saved position in data files that changed size; not an exact resume), restart "
        "(read the data from the start; weights, optimizer and LR schedule still resume)",
    )
    ckpt.add_argument(
        "--keep-checkpoints",
        "--num-checkpoints",
        dest="keep_checkpoints",
        type=int,
        default=3,
        help="checkpoints kept on disk (0: keep all)",
    )
    ckpt.add_argument(
        "--async-checkpoint",
        type=str_to_bool,
        default=True,
        help="true: copy the state to host memory and write the checkpoint in a background thread while training "
        "goes on (host memory for one checkpoint per host); false: training waits for the whole write",
    )

    logging = parser.add_argument_group("logging")
    logging.add_argument(
        "--train-log-backend",
        default="print",
        help="print | loguru | wandb | tensorboard, or several joined by commas (print,tensorboard)",
    )
    logging.add_argument(
        "--tensorboard-dir", default=None, help="tensorboard event files (default: <checkpoint-path>/tensorboard)"
    )
    logging.add_argument("--project-name", default="openchatkit-finetune", help="wandb project")
    logging.add_argument("--job-id", default="0", help="name of this job in logs and wandb")
    logging.add_argument("--log-interval", type=int, default=1, help="log every N optimizer steps")
    logging.add_argument("--metrics-file", default=None, help="also append each step's metrics as JSON lines here")
    logging.add_argument(
        "--profiling", choices=("no-profiling", "tidy_profiling", "pytorch_profiling"), default="no-profiling"
    )
    logging.add_argument("--profiling-dir", default="./profiles")
    logging.add_argument("--profiling-steps", type=int, default=3, help="optimizer steps traced when profiling")
    return parser


def _writable_dir(flag, path, what="directory"):
    """A directory that is there or can be made and written: the nearest existing ancestor decides."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ArgumentError(f"{flag} {path}: {probe} is not a directory; give a {what} that can be created")
    if not os.access(probe, os.W_OK):
        raise ArgumentError(f"{flag} {path}: {probe} is not writable; give a {what} you can write")


def _check_paths(args):
    _writable_dir("--checkpoint-path", args.checkpoint_path)
    if args.metrics_file:
        _writable_dir("--metrics-file", os.path.dirname(os.path.abspath(args.metrics_file)), "file path")
        if os.path.isdir(args.metrics_file):
            raise ArgumentError(f"--metrics-file {args.metrics_file} is a directory; give a file path")
    if args.profiling != "no-profiling":
        _writable_dir("--profiling-dir", args.profiling_dir)
    if not args.load_checkpoint and os.path.isdir(args.checkpoint_path):
        used = sorted(n for n in os.listdir(args.checkpoint_path) if n == LATEST or n.startswith(step_dir_name("")))
        if used:  # a fresh run would save over them and rotate them away
            raise ArgumentError(
                f"--checkpoint-path {args.checkpoint_path} holds another run's checkpoints "
                f"({', '.join(used[:3])}) and --load-checkpoint false would replace them; give a new "
                f"--checkpoint-path, resume with --load-checkpoint true, or delete them"
            )


def validate_args(args):
    """Raise ArgumentError for combinations that cannot work. Needs no model, data or process group."""

    def positive(name, value):
        if value is None or value < 1:
            raise ArgumentError(f"--{name} must be a positive integer, got {value}")

    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every `<` check below
            raise ArgumentError(f"--{name.replace('_', '-')} must be a finite number, got {value}")

    positive("seq-length", args.seq_length)
    positive("batch-size", args.batch_size)
    positive("micro-batch-size", args.micro_batch_size)
    positive("gradient-accumulate-step", args.gradient_accumulate_step)
    positive("pipeline-group-size", args.pipeline_group_size)
    positive("data-group-size", args.data_group_size)
    if args.batch_size % args.micro_batch_size:
        raise ArgumentError(
            f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size}"
        )
    pp = args.pipeline_group_size
    n_micro = args.batch_size // args.micro_batch_size
    if args.pp_mode == "interleaved-1f1b":
        if args.virtual_stages < 2:
            raise ArgumentError("--pp-mode interleaved-1f1b needs --virtual-stages >= 2")
        if pp < 2:
            raise ArgumentError("--pp-mode interleaved-1f1b needs --pipeline-group-size >= 2; use gpipe or 1f1b")
        if n_micro % pp:
            raise ArgumentError(
                f"--pp-mode interleaved-1f1b needs the micro-batch count (--batch-size / "
                f"--micro-batch-size = {n_micro}) to be a multiple of --pipeline-group-size {pp}"
            )
    if args.pp_mode == "1f1b" and pp > 1 and n_micro < pp:
        raise ArgumentError(
            f"--pp-mode 1f1b needs at least --pipeline-group-size ({pp}) micro-batches per "
            f"iteration, got {n_micro}; raise --batch-size or lower --micro-batch-size"
        )
    expected_world = pp * args.data_group_size
    if args.world_size is not None and args.world_size != expected_world:
        raise ArgumentError(
            f"--world-size {args.world_size} must equal --pipeline-group-size x --data-group-size = {expected_world}"
        )
    _check_lora(args)
    if args.optimizer == "8bit-adam" and args.offload_optimizer != "none":
        raise ArgumentError(
            "--offload-optimizer cpu steps torch's AdamW on the host and 8-bit Adam (bitsandbytes) runs on the GPU; "
            "use --optimizer adamw with --offload-optimizer cpu, or drop --offload-optimizer"
        )
    if args.fp16 and args.bf16:
        raise ArgumentError("--fp16 and --bf16 exclude each other; pick one")
    if not args.dp_bucket_mb > 0:
        raise ArgumentError(f"--dp-bucket-mb must be above 0, got {args.dp_bucket_mb}; the default is 64")
    _check_fp8(args)
    if args.loss_scale < 0:
        raise ArgumentError(f"--loss-scale must be >= 0 (0 = dynamic), got {args.loss_scale}")
    if args.initial_loss_scale <= 0 or args.min_loss_scale <= 0 or args.loss_scale_window < 1 or args.hysteresis < 1:
        raise ArgumentError(
            "--initial-loss-scale and --min-loss-scale must be > 0, --loss-scale-window and --hysteresis >= 1"
        )
    if args.lr < 0:
        raise ArgumentError(f"--lr must be >= 0, got {args.lr}")
    if args.warmup_steps < 0:
        raise ArgumentError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.train_warmup_steps != 0:
        raise ArgumentError("--train-warmup-steps is not supported (OpenChatKit ignored it); pass 0 or drop it")
    if not 0 <= args.adam_beta1 < 1 or not 0 <= args.adam_beta2 < 1 or args.adam_eps <= 0:
        raise ArgumentError("--adam-beta1/--adam-beta2 must be in [0, 1) and --adam-eps > 0")
    if args.weight_decay < 0 or args.max_grad_norm < 0:
        raise ArgumentError("--weight-decay and --max-grad-norm must be >= 0")
    if (args.total_steps is None) == (args.nepochs is None):
        raise ArgumentError("give --total-steps N or --nepochs N (one of them)")
    if args.total_steps is not None and args.total_steps < 1:
        raise ArgumentError(f"--total-steps must be >= 1, got {args.total_steps}")
    if args.nepochs is not None and args.nepochs < 1:
        raise ArgumentError(f"--nepochs must be >= 1, got {args.nepochs}")
    if args.total_steps is not None and args.total_steps % args.gradient_accumulate_step:
        raise ArgumentError(
            f"--total-steps {args.total_steps} counts iterations including accumulation; it must be "
            f"a multiple of --gradient-accumulate-step {args.gradient_accumulate_step}"
        )
    if args.checkpoint_steps < 0 or args.evaluation_steps < 0 or args.keep_checkpoints < 0:
        raise ArgumentError("--checkpoint-steps, --evaluation-steps and --keep-checkpoints must be >= 0")
    if args.evaluation_steps and not args.evaluation_data:
        raise ArgumentError("--evaluation-steps needs --evaluation-data FILE[,FILE]")
    if not args.task_name:
        raise ArgumentError(
            "--task-name is required: comma-separated source[:weight] (.jsonl, .parquet or .arrow files, folders, "
            "hf:ORG/NAME)"
        )
    if not os.path.isdir(args.model_name):
        raise ArgumentError(
            f"--model-name {args.model_name}: no such directory (hub names cannot be downloaded "
            f"here; pass a local Hugging Face or layer-sharded directory)"
        )
    if not os.path.isfile(os.path.join(args.model_name, "config.json")):
        raise ArgumentError(f"--model-name {args.model_name}: no config.json in it")
    tokenizer = args.tokenizer_name or args.model_name
    if not os.path.isdir(tokenizer):
        raise ArgumentError(f"--tokenizer-name {tokenizer}: no such directory")
    if not any(os.path.isfile(os.path.join(tokenizer, name)) for name in TOKENIZER_FILES):
        raise ArgumentError(
            f"--tokenizer-name {tokenizer}: no tokenizer files in it (one of "
            f"{', '.join(TOKENIZER_FILES)}); point it at the model's tokenizer"
        )
    if args.dist_timeout <= 0:
        raise ArgumentError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.log_interval < 1:
        raise ArgumentError("--log-interval must be >= 1")
    if args.shuffle_buffer < 1 or args.data_workers < 0:
        raise ArgumentError(
            f"--shuffle-buffer must be >= 1 and --data-workers >= 0 (0: tokenise on the training "
            f"thread), got {args.shuffle_buffer} and {args.data_workers}"
        )
    if args.evaluation_num_batch is not None and args.evaluation_num_batch < 1:
        raise ArgumentError(
            f"--evaluation-num-batch must be >= 1 (omit it to evaluate every batch), got {args.evaluation_num_batch}"
        )
    if args.dist_url and not args.dist_url.startswith(("tcp://", "env://", "file://")):
        raise ArgumentError(f"--dist-url {args.dist_url}: expected tcp://HOST:PORT (the address of rank 0)")
    if args.net_interface:
        try:
            names = {name for _, name in socket.if_nameindex()}
        except OSError:  # no interface list on this system: let the process group find out
            names = {args.net_interface}
        if args.net_interface not in names:
            raise ArgumentError(
                f"--net-interface {args.net_interface}: no such network interface here (this "
                f"machine has {', '.join(sorted(names))})"
            )
    _check_log_backends(args)
    _check_data_format(args)
    _check_paths(args)


def _check_lora(args):
    if args.lora_r < 0:
        raise ArgumentError(f"--lora-r must be >= 0 (0: no adapters), got {args.lora_r}")
    if args.lora_r == 0:
        for flag, given in (
            ("--quantize-base", args.quantize_base != "none"),
            ("--lora-init", args.lora_init is not None),
            ("--lora-target-modules", args.lora_target_modules is not None),
        ):
            if given:
                raise ArgumentError(f"{flag} needs adapters: add --lora-r R (16 is a common rank)")
        return
    if args.lora_alpha <= 0:
        raise ArgumentError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise ArgumentError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_init is not None and not os.path.isfile(os.path.join(args.lora_init, "adapter_config.json")):
        raise ArgumentError(
            f"--lora-init {args.lora_init}: no adapter_config.json there; give a peft adapter directory "
            f"(what PeftModel.save_pretrained or tools/convert_to_hf.py writes)"
        )


def _check_fp8(args):
    if args.fp8 == "none":
        return
    flag = f"--fp8 {args.fp8}"
    if not args.use_cuda:  # modules/fp8.py checks the GPU itself once the process has one
        raise ArgumentError(
            "--fp8 needs an NVIDIA GPU with compute capability 8.9+ (H100/L4/RTX 4090); this run has "
            "--use-cuda false (CPU); drop --fp8"
        )
    if args.fp16 or not args.bf16:
        raise ArgumentError(
            f"{flag} trains a bf16 model (float8 matmuls, bf16 weights, fp32 master weights): "
            f"{'replace --fp16 with' if args.fp16 else 'add'} --bf16"
        )
    if args.lora_r:
        raise ArgumentError(
            f"{flag} and LoRA adapters (--lora-r, --quantize-base) are not supported together; drop one of them"
        )
    if (args.micro_batch_size * args.seq_length) % 16:
        raise ArgumentError(
            f"{flag} needs --micro-batch-size x --seq-length to be a multiple of 16 (the tokens of a float8 "
            f"matmul), got {args.micro_batch_size} x {args.seq_length}; use a --seq-length that is a multiple of 16"
        )
    if importlib.util.find_spec("torchao") is None:  # without importing it: torchao takes seconds to import
        raise ArgumentError(f"{flag}: float8 training needs torchao: pip install torchao")


def _check_log_backends(args):
    try:
        backends = parse_backends(args.train_log_backend)
    except ValueError as e:
        raise ArgumentError(f"--train-log-backend {args.train_log_backend}: {e}") from None
    if "tensorboard" in backends:
        _writable_dir("--tensorboard-dir", tensorboard_dir(args))


def tensorboard_dir(args):
    """--tensorboard-dir, or its default under --checkpoint-path."""
    return args.tensorboard_dir or os.path.join(args.checkpoint_path, "tensorboard")


# --data-format values, and the field flags that each one reads (tasks.render.RecordFormat)
DATA_FORMATS = ("auto", "text", "messages", "sharegpt", "alpaca")
_FIELDS_READ = {
    "auto": ("text_field", "messages_field"),
    "text": ("text_field",),
    "messages": ("messages_field",),
    "sharegpt": ("messages_field",),
    "alpaca": (),
}


def _check_data_format(args):
    for name in ("text_field", "messages_field"):
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if value is not None and not value.strip():
            raise ArgumentError(f"{flag} is empty; give the column name, or omit it for the default")
        if value is not None and name not in _FIELDS_READ[args.data_format]:
            raise ArgumentError(
                f"{flag} {value} has no effect with --data-format {args.data_format} (it reads "
                f"{', '.join('--' + f.replace('_', '-') for f in _FIELDS_READ[args.data_format]) or 'fixed columns'}); "
                f"drop it or use --data-format auto"
            )


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.tokenizer_name = args.tokenizer_name or args.model_name
    args.tensorboard_dir = tensorboard_dir(args)
    return args


def job_config(args) -> sections.JobConfig:
    """The typed sections the components take, from validated flags."""
    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    return sections.JobConfig(
        dist=sections.DistConfig(
            pipeline_size=args.pipeline_group_size,
            data_size=args.data_group_size,
            dist_url=args.dist_url,
            rank=args.rank,
            world_size=args.world_size,
            cuda_id=args.cuda_id,
            use_cuda=args.use_cuda,
            backend=args.dp_backend,
            net_interface=args.net_interface,
            timeout_s=args.dist_timeout,
        ),
        model=sections.ModelRunConfig(
            model_dir=args.model_name,
            tokenizer_dir=args.tokenizer_name,
            model_type=args.model_type,
            layers_per_stage=args.num_layers,
            embedding_dim=args.embedding_dim,
            load_pretrained=args.load_pretrained_model,
            activation_checkpointing=args.activation_checkpointing,
            compile=args.compile,
            attention_backend=args.attention_backend,
            attention_mask=args.attention_mask,
            dtype=dtype,
            seed=args.seed,
            fp8=args.fp8,
        ),
        lora=sections.LoraRunConfig(
            r=args.lora_r,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=args.lora_target_modules,
            quantize_base=args.quantize_base,
            init_dir=args.lora_init,
        ),
        pipeline=sections.PipelineConfig(
            mode=args.pp_mode,
            virtual_stages=args.virtual_stages,
            micro_batches=args.batch_size // args.micro_batch_size,
        ),
        data=sections.DataConfig(
            task_spec=args.task_name,
            seq_length=args.seq_length,
            batch_size=args.batch_size,
            accumulation=args.gradient_accumulate_step,
            train_on_inputs=args.train_on_inputs,
            loss_on_bot_only=args.loss_on_bot_only,
            shuffle_buffer=args.shuffle_buffer,
            workers=args.data_workers,
            data_format=args.data_format,
            text_field=args.text_field,
            messages_field=args.messages_field,
            seed=args.seed,
            evaluation_data=args.evaluation_data,
            evaluation_every=args.evaluation_steps,
            evaluation_batches=args.evaluation_num_batch,
            total_iterations=args.total_steps,
            epochs=args.nepochs,
        ),
        optimizer=sections.OptimizerConfig(
            kind=args.optimizer,
            lr=args.lr,
            lr_scheduler=args.lr_scheduler,
            warmup_iterations=args.warmup_steps,
            accumulation=args.gradient_accumulate_step,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
            max_grad_norm=args.max_grad_norm,
            fp16=args.fp16,
            loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale,
            loss_scale_window=args.loss_scale_window,
            hysteresis=args.hysteresis,
            min_loss_scale=args.min_loss_scale,
            dp_mode=args.dp_mode,
            dp_bucket_mb=args.dp_bucket_mb,
            offload=args.offload_optimizer,
        ),
        checkpoint=sections.CheckpointConfig(
            path=args.checkpoint_path,
            every_steps=args.checkpoint_steps,
            resume=args.load_checkpoint,
            fallback=args.resume_fallback,
            resume_data=args.resume_data,
            keep=args.keep_checkpoints,
            async_write=args.async_checkpoint,
        ),
        log=sections.LogConfig(
            backend=args.train_log_backend,
            project=args.project_name,
            job_id=args.job_id,
            every_steps=args.log_interval,
            metrics_file=args.metrics_file or os.path.join(args.checkpoint_path, "metrics.jsonl"),
            tensorboard_dir=args.tensorboard_dir,
            curves_file=os.path.join(args.checkpoint_path, "curves.png"),
        ),
        profiling=sections.ProfilingConfig(
            mode=args.profiling, directory=args.profiling_dir, steps=args.profiling_steps
        ),
        flags=json.loads(json.dumps(vars(args), default=str)),  # JSON-safe, for metadata and wandb
    )
