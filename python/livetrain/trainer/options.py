"""The trainer's command-line options, defined once for every launcher: ``python -m livetrain.trainer``,
``livetrain serve`` (which passes them on to the trainer it starts, and the store options to its engine)
and the vLLM plugin (``$LIVETRAIN_TRAINER_ARGS``). ``add_options`` puts them on a parser; ``argv`` turns
the parsed values back into the words that start a trainer with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

DEFAULT_STATE_DIR = "livetrain-state"
# How embeddings and lm_head are trained: optim.param_groups' choices (named here, where torch is not imported).
EMBEDDINGS = ("apollo", "adamw", "frozen")
# How a job picks the replayed retention rows of each step (trainer.schedule.Replayed).
REPLAY_SELECT = ("cycle", "similar")
# Which of the model's parameters a job trains (the rest stay as they are for that job; trainer.service
# ``Trainer.trained_parameters``): all of them, the layers' (not the embeddings nor the output projection),
# or the layers' MLP matrices alone.
TRAIN = ("all", "layers", "mlp")
GUARD_PREPARE = ("idle", "job")
# Which built-in retention prompts the guard uses (trainer.guard.Retention): auto picks by device.
BUILTIN_RETENTION = ("auto", "all", "core")
# The learning defaults; docs/learning.md "How the defaults were chosen" says which rest on a measurement.
LEARNING = {
    "lr": 5e-5,
    "warmup": 0,
    "until_loss": 0.1,
    "max_steps": 400,
    "replay": 8,
    "anchor": 4.0,
    "reword": False,
    "restate": False,
    "replay_select": "similar",
    "train": "all",
    "guard_threshold": 0.3,
    "guard_min_kept": 0.0,
}
# The most steps a job may take, whether given as steps or max_steps (trainer.examples) or as epochs
# (trainer.schedule.plan).
MAX_STEPS = 100_000
# The values each numeric training option takes: key -> (check, what a valid value is). The option's argparse
# type (``ranged``) checks with it, and so does a job's field of the same name (trainer.examples.JOB_OPTIONS):
# a server default is never one that a job could not give. A check is false for NaN.
RANGES = {
    "lr": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "until_loss": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "max_steps": (lambda v: 1 <= v <= MAX_STEPS, f"an integer from 1 to {MAX_STEPS}"),
    "warmup": (lambda v: 0 <= v <= 100_000, "an integer from 0 to 100000"),
    "replay": (lambda v: 0 <= v <= 1024, "an integer from 0 to 1024"),
    "anchor": (lambda v: 0 <= v <= 1000, "a number from 0 to 1000"),
    "batch_size": (lambda v: 1 <= v <= 1024, "an integer from 1 to 1024"),
    "guard_threshold": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "guard_min_kept": (lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "checkpoint_every": (lambda v: 0 <= v < math.inf, "a finite number of seconds >= 0"),
    "tp_timeout": (lambda v: 0 < v < math.inf, "a finite number of seconds > 0"),
    "max_seq_len": (lambda v: v >= 1, "an integer >= 1"),
    "queue_size": (lambda v: v >= 1, "an integer >= 1"),
}


def ranged(key: str, kind: type):
    """The argparse type of the option ``key``: a ``kind`` (int or float) within ``RANGES[key]``; argparse's
    error names the option, the value and the range."""
    check, what = RANGES[key]

    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: expected {what}") from None
        if not check(v):
            raise argparse.ArgumentTypeError(f"{value!r}: expected {what}")
        return v

    return parse


def port(value: str) -> int:
    """``--port`` of ``livetrain serve`` and the reference engine (an argparse type): a TCP port, 0 to 65535."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a TCP port from 0 to 65535")
    return n


def state_dir(value: str) -> str:
    """``--state-dir`` (an argparse type): a directory, or a path where the trainer can make one at start.
    Refused here when it, or the nearest part of it that exists, is not a directory: the trainer would die
    at start, and ``livetrain serve`` restart it in a loop."""
    path = os.path.abspath(value)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "it" if path == os.path.abspath(value) else path
        raise argparse.ArgumentTypeError(f"{value!r}: {what} exists and is not a directory")
    return value


def retention(value: str) -> str:
    """``--retention`` (an argparse type): a file that can be read, opened as the trainer opens it. Its prompts
    are checked by the trainer at start (trainer.guard.read_prompts: torch's side, which ``livetrain serve``
    does not import)."""
    try:
        with open(value) as f:
            f.read()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{value!r} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not text ({e.reason} at byte {e.start})") from None
    return value


def device(value: str) -> str:
    """The ``--device`` of ``livetrain serve`` and the reference engine (an argparse type): ``cpu``, ``cuda`` or
    ``cuda:N``. A CUDA device is refused here, with the core's reason, when this build of the core has no CUDA
    support, sees no such GPU, or has no code that runs on it: failing at the first kernel, after the model
    has loaded, would say less and later."""
    if value == "cpu":
        return value
    kind, colon, index = value.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"{value!r}: expected cpu, cuda or cuda:N")
    from livetrain import _core

    problem = _core.cuda_device_problem(int(index) if colon else 0)
    if problem:
        raise argparse.ArgumentTypeError(f"{value}: {problem}")
    return value


def _auto_or_at_least(value: str, least: int, unit: str) -> int | str:
    """An argparse type's value: ``auto``, or a whole number of ``unit`` >= ``least``."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = least - 1
    if n < least:
        raise argparse.ArgumentTypeError(f"{value!r}: expected auto or a whole number of {unit} >= {least}")
    return n


def batch_tokens(value: str) -> int | str:
    """``--max-batch-tokens`` (an argparse type): ``auto`` or a whole number >= 1."""
    return _auto_or_at_least(value, 1, "tokens")


def step_batch_mib(value: str) -> int | str:
    """``--step-batch-mib`` (an argparse type): ``auto`` or a whole number >= 0."""
    return _auto_or_at_least(value, 0, "MiB")


def add_store_options(parser) -> None:
    """``--store DIR`` / ``--no-store``: which checkpoint store the engine and the trainer use."""
    parser.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help="the model's checkpoint store (default MODEL/.livetrain-store; the engine creates it "
        "when missing and serves its newest generation; POST /checkpoint and "
        "--checkpoint-every add generations)",
    )
    parser.add_argument(
        "--no-store",
        action="store_true",
        help="no checkpoint store: serve the model files as they are; /checkpoint, /checkpoints "
        "and /rollback answer 409",
    )


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A ``--chat-template`` value as given (``value``: what ``chat_argv`` passes on) and the template it holds."""

    value: str
    text: str


def chat_template(value: str) -> ChatTemplate:
    """``--chat-template`` (an argparse type, the one reader of the option: the trainer, ``livetrain serve``, the
    reference engine and the vLLM plugin's trainer all read it here): the path of a file holding the template,
    or the template itself, told apart as vLLM does: a value that is no file and has none of ``{``, ``}`` or a
    newline is a path that is missing. The template must compile as transformers compiles a chat template:
    a mistake is refused at start, naming the option, rather than at the first chat request or example."""
    try:
        with open(value, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        if not any(c in value for c in "{}\n"):
            raise argparse.ArgumentTypeError(
                f"{value!r} looks like a file's path, but it cannot be read ({e.strerror})"
            )
        text = value
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    import jinja2
    from transformers.utils import chat_template_utils

    try:
        chat_template_utils._compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as e:
        where = "the template" if text is value else repr(value)
        raise argparse.ArgumentTypeError(f"{where} is not a valid Jinja template (line {e.lineno}: {e.message})")
    return ChatTemplate(value, text)


# vLLM's --chat-template-content-format: how a message's string content reaches the template (string: as is;
# openai: a list of one {"type": "text", "text": ...} part). auto: vLLM detects it from the template; livetrain
# renders string (the vLLM plugin passes the format vLLM detected).
CONTENT_FORMATS = ("auto", "string", "openai")


def chat_template_kwargs(value: str | dict) -> dict:
    """``--default-chat-template-kwargs`` (an argparse type; also the check of vLLM's, a dict): a JSON object of
    variables for the chat template (Qwen3's ``{"enable_thinking": false}``), passed to every rendering as
    vLLM passes its defaults. Refused: anything but an object, and the names of ``apply_chat_template``'s
    own parameters (``tokenize``, ``add_generation_prompt``, ...), which livetrain sets itself."""
    kwargs = value
    if isinstance(value, str):
        try:
            kwargs = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{value!r} is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError(f"{json.dumps(kwargs)[:80]} is not a JSON object of template variables")
    if kwargs:
        import inspect

        from transformers import PreTrainedTokenizerBase

        own = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) | {"messages"}
        taken = sorted(own & set(kwargs))
        if taken:
            raise argparse.ArgumentTypeError(
                f"{', '.join(taken)}: not a template variable (apply_chat_template's own; livetrain sets it)"
            )
    return kwargs


@dataclasses.dataclass(frozen=True)
class Chat:
    """How chat messages are rendered (trainer.examples.use_chat): the chat-template options' values."""

    template: str | None = None  # None: the tokenizer's own
    kwargs: dict = dataclasses.field(default_factory=dict)
    content_format: str = "auto"


def chat(ns: argparse.Namespace) -> Chat:
    """The chat-template options of ``ns`` as one value."""
    return Chat(
        ns.chat_template.text if ns.chat_template is not None else None,
        dict(ns.default_chat_template_kwargs or {}),
        ns.chat_template_content_format,
    )


def add_chat_options(parser) -> None:
    """``--chat-template``, ``--default-chat-template-kwargs``, ``--chat-template-content-format`` (vLLM's
    names and meanings): how the trainer and the reference engine render chat messages
    (trainer.examples.use_chat), ``livetrain serve`` passing them to both."""
    parser.add_argument(
        "--chat-template",
        type=chat_template,
        default=None,
        metavar="FILE|TEMPLATE",
        help="the chat template (a file, or the Jinja template itself, as vLLM's --chat-template) that chat "
        "requests, chat examples and the guard's retention prompts are rendered with, in place of the one in "
        "the model's tokenizer files: a base model's chat, or another template than the files'. Default: the "
        "files' (none: chat examples and chat requests are refused). Read at start: a missing file or a template "
        "that does not compile stops the start. The vLLM plugin passes vLLM's own --chat-template to its trainer",
    )
    parser.add_argument(
        "--default-chat-template-kwargs",
        type=chat_template_kwargs,
        default=None,
        metavar="JSON",
        help="a JSON object of variables for the chat template, given to every rendering (as vLLM's option; "
        "a chat request's own chat_template_kwargs override them on the engine, a /train job renders with "
        "these), e.g. '{\"enable_thinking\": false}' for Qwen3. The vLLM plugin passes vLLM's own",
    )
    parser.add_argument(
        "--chat-template-content-format",
        default="auto",
        choices=CONTENT_FORMATS,
        help="how a message's content reaches the chat template (as vLLM's option): string (text parts joined "
        "with newlines), or openai (a list of text parts: a string as one, parts as sent; for templates that "
        "loop over a message's content parts). auto: string (vLLM "
        "detects it from the template: the vLLM plugin passes the format vLLM uses) (default auto)",
    )


def chat_argv(ns: argparse.Namespace) -> list[str]:
    """The chat-template options as command-line words (none of those left at their defaults)."""
    words = ["--chat-template", ns.chat_template.value] if ns.chat_template is not None else []
    if ns.default_chat_template_kwargs:
        words += ["--default-chat-template-kwargs", json.dumps(ns.default_chat_template_kwargs)]
    if ns.chat_template_content_format != "auto":
        words += ["--chat-template-content-format", ns.chat_template_content_format]
    return words


def add_options(parser: argparse.ArgumentParser) -> None:
    """Every option of the trainer process except where it attaches (manifest, model, socket)."""
    parser = parser.add_argument_group("training options")
    parser.add_argument(
        "--state-dir",
        type=state_dir,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="optimizer state and weight version, saved after every job and restored at start "
        f"(default ./{DEFAULT_STATE_DIR})",
    )
    add_store_options(parser)
    add_chat_options(parser)
    parser.add_argument(
        "--checkpoint-every",
        type=ranged("checkpoint_every", float),
        default=0.0,
        metavar="SECONDS",
        help="save a generation every SECONDS when the weights changed since the last one "
        "(default 0: only on POST /checkpoint)",
    )
    add_learning_options(parser)
    parser.add_argument(
        "--max-batch-tokens",
        type=batch_tokens,
        default="auto",
        metavar="N|auto",
        help="tokens one step may compute (examples × the longest, padding included): a job whose batches "
        "would exceed it runs in smaller batches, or is refused with a 400 naming the limit when it set "
        "batch_size itself or one example is longer. Default auto: chosen at start from the model's size and "
        "the device's memory (a tenth of it, at most 80%% of what is free, at the cost per token that "
        "bench/train_memory.py measured); the trainer logs the number and /train/status shows it",
    )
    parser.add_argument(
        "--step-batch-mib",
        type=step_batch_mib,
        default="auto",
        metavar="N|auto",
        help="the backward hooks' optimizer steps wait until the waiting gradients hold N MiB and then step "
        "together in one batched launch (fewer launches; the same bits): up to N MiB more memory in a step, "
        "which the step's memory budget counts. 0: each parameter steps alone as its gradient arrives. "
        "Default auto: 1/16 of the trained weights' bytes, at most 1024 MiB, on a GPU; 0 on the CPU, where a "
        "batch saves nothing (docs/tuning.md)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=ranged("max_seq_len", int),
        default=None,
        metavar="N",
        help="longest training example in tokens (default: the model's context)",
    )
    parser.add_argument(
        "--queue-size",
        type=ranged("queue_size", int),
        default=8,
        metavar="N",
        help="queued jobs before /train answers 429 (default 8)",
    )
    parser.add_argument(
        "--embeddings", default="apollo", choices=EMBEDDINGS, help="how embeddings and lm_head are trained"
    )
    parser.add_argument(
        "--no-grad-checkpointing",
        action="store_true",
        help="keep every layer's activations instead of recomputing them in backward",
    )
    parser.add_argument(
        "--fused-ops",
        choices=["auto", "off"],
        default="auto",
        help="auto (default): on a GPU with liger-kernel installed, the model's RMSNorms, rotary embedding and "
        "SiLU-gated MLP run as its fused kernels, each first checked against the PyTorch operations (a step "
        "of an 8B model 1.21x faster on the H200 at TP 1, none at a TP-2 rank's shapes; less memory at both; "
        "/train/status 'fused_ops' says what runs); off: the PyTorch operations",
    )
    parser.add_argument(
        "--tp-timeout",
        type=ranged("tp_timeout", float),
        default=1800.0,
        metavar="SECONDS",
        help="tensor parallelism: how long a trainer rank waits for the others in one collective before the "
        "job fails on every rank (default 1800; a rank that dies is noticed at once on CPU)",
    )


# The learning options that take a value: (flag, key in LEARNING, type, metavar, what it sets).
_LEARNING_OPTIONS = (
    ("--lr", "lr", float, "LR", "default learning rate of a job (APOLLO-Mini)"),
    ("--warmup", "warmup", int, "STEPS", "default linear warm-up of the learning rate, in steps"),
    (
        "--until-loss",
        "until_loss",
        float,
        "LOSS",
        "a job without steps or epochs trains until every example's mean loss on its trained tokens is below LOSS",
    ),
    ("--max-steps", "max_steps", int, "N", "... or until it has taken N steps"),
    (
        "--replay",
        "replay",
        int,
        "N",
        "retention examples (prompts with the model's own answers before the job) trained on at every step "
        "of a guarded job",
    ),
    (
        "--anchor",
        "anchor",
        float,
        "BETA",
        "0: the replayed retention examples are trained as ordinary examples (one-hot, the model's own "
        "answers); > 0: as BETA x the KL divergence from the starting model's next-token distributions",
    ),
    (
        "--guard-threshold",
        "guard_threshold",
        float,
        "NATS",
        "roll a guarded job back when the KL divergence from the starting model's next-token distributions on "
        "the held-out retention answers (nats per answer token) exceeds NATS",
    ),
    (
        "--guard-min-kept",
        "guard_min_kept",
        float,
        "FRACTION",
        "... or when fewer than FRACTION of the held-out retention prompts keep their greedy answer (its "
        "first 16 tokens); 0: not checked (answers kept are still reported)",
    ),
)


# The learning options that are on or off: (key in LEARNING and flag, what on does).
_LEARNING_SWITCHES = (
    (
        "reword",
        "the served model rewords each chat example's last question once and a job trains the reworded questions too",
    ),
    ("restate", "a job also trains each chat example's answer as plain text, without its question (trainer.augment)"),
)


def add_learning_options(parser) -> None:
    """The defaults of a job's learning (each a job field too) and of its forgetting guard; the numbers
    that chose them are in docs/learning.md."""
    for flag, key, kind, metavar, what in _LEARNING_OPTIONS:
        parser.add_argument(
            flag,
            type=ranged(key, kind),
            default=LEARNING[key],
            metavar=metavar,
            help=f"{what} (default {LEARNING[key]})",
        )
    for key, what in _LEARNING_SWITCHES:
        parser.add_argument(
            f"--{key}",
            action=argparse.BooleanOptionalAction,
            default=LEARNING[key],
            help=f'whether {what}, when the job does not set "{key}" itself '
            f"(default {'on' if LEARNING[key] else 'off'}: --{'' if LEARNING[key] else 'no-'}{key})",
        )
    parser.add_argument(
        "--replay-select",
        default=LEARNING["replay_select"],
        choices=REPLAY_SELECT,
        help="which replayed retention rows join each step: cycle (in turn) or similar (half of them the rows "
        "whose prompts share the most rare tokens with the step's examples' prompts, the rest in turn) "
        f"(default {LEARNING['replay_select']})",
    )
    parser.add_argument(
        "--train",
        default=LEARNING["train"],
        choices=TRAIN,
        help="which parameters a job trains by default: all, layers (not the embeddings nor the output "
        f"projection) or mlp (the layers' MLP matrices alone) (default {LEARNING['train']})",
    )
    parser.add_argument(
        "--batch-size", type=ranged("batch_size", int), default=8, help="default examples per step (default 8)"
    )
    parser.add_argument(
        "--no-guard",
        action="store_true",
        help="jobs are not guarded by default: no retention measured, no replay, no automatic rollback "
        '(a job can still ask for "guard": true)',
    )
    parser.add_argument(
        "--guard-prepare",
        default="idle",
        choices=GUARD_PREPARE,
        help="when the guard makes its measures of the weights a job starts from (the retention answers, the "
        "held-out reference distributions and answers): idle (between jobs, as soon as the weights change, "
        "so that the next job finds them made) or job (at each guarded job's start, on its path) "
        "(default idle; docs/learning.md)",
    )
    parser.add_argument(
        "--builtin-retention",
        default="auto",
        choices=BUILTIN_RETENTION,
        help="the built-in retention prompts: all (the 80 alternating between replay and held out, and 313 "
        "replayed only, of many question forms, for replay_select similar), core (the 80 alone) or auto: all on "
        "a GPU, core on a CPU, where the model's answers to the 393 take minutes (about 5x the 80's; "
        "docs/learning.md) (default auto)",
    )
    parser.add_argument(
        "--retention",
        type=retention,
        default=None,
        metavar="FILE",
        help="the user's own retention prompts, added to the built-in ones: JSON lines, each a string "
        '(a user message) or {"messages": [...]} ending with a user message; at most 1000 (also PUT /train/retention)',
    )


def check(ns: argparse.Namespace) -> str | None:
    """What is wrong with a combination of the options (None: nothing); each value alone is checked by its
    argparse type (``RANGES``)."""
    if ns.no_store and (ns.store or ns.checkpoint_every):
        return "--no-store cannot be combined with --store or --checkpoint-every"
    return None


def store_argv(ns: argparse.Namespace) -> list[str]:
    """The store options as command-line words."""
    return ["--no-store"] if ns.no_store else ["--store", ns.store] if ns.store else []


def argv(ns: argparse.Namespace) -> list[str]:
    """Every option of ``add_options`` as command-line words, for the trainer process."""
    return [
        "--state-dir",
        ns.state_dir,
        *store_argv(ns),
        *chat_argv(ns),
        "--checkpoint-every",
        str(ns.checkpoint_every),
        "--lr",
        str(ns.lr),
        "--warmup",
        str(ns.warmup),
        "--batch-size",
        str(ns.batch_size),
        "--max-batch-tokens",
        str(ns.max_batch_tokens),
        "--until-loss",
        str(ns.until_loss),
        "--max-steps",
        str(ns.max_steps),
        "--replay",
        str(ns.replay),
        "--anchor",
        str(ns.anchor),
        "--reword" if ns.reword else "--no-reword",
        "--restate" if ns.restate else "--no-restate",
        "--replay-select",
        ns.replay_select,
        "--train",
        ns.train,
        *(["--no-guard"] if ns.no_guard else []),
        "--guard-threshold",
        str(ns.guard_threshold),
        "--guard-min-kept",
        str(ns.guard_min_kept),
        "--guard-prepare",
        ns.guard_prepare,
        "--builtin-retention",
        ns.builtin_retention,
        *(["--retention", ns.retention] if ns.retention else []),
        "--step-batch-mib",
        str(ns.step_batch_mib),
        *(["--max-seq-len", str(ns.max_seq_len)] if ns.max_seq_len else []),
        "--queue-size",
        str(ns.queue_size),
        "--embeddings",
        ns.embeddings,
        *(["--no-grad-checkpointing"] if ns.no_grad_checkpointing else []),
        "--fused-ops",
        ns.fused_ops,
        "--tp-timeout",
        str(ns.tp_timeout),
    ]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser``'s arguments with the training options added and checked (``parser.error`` when a
    combination is wrong): what every launcher with a command line of its own calls."""
    add_options(parser)
    ns = parser.parse_args(argv)
    problem = check(ns)
    if problem:
        parser.error(problem)
    return ns


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(message)


def parse(words: list[str]) -> argparse.Namespace:
    """The training options alone from words (``$LIVETRAIN_TRAINER_ARGS``); ValueError with argparse's
    message."""
    return parse_args(_Parser(prog="trainer options", add_help=False), words)
