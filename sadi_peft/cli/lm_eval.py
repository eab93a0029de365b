"""``sadi-peft lm-eval``: run lm-evaluation-harness with the SADI PEFT type registered.

lm-eval's ``hf`` model loads an adapter with ``PeftModel.from_pretrained(model, peft)``. PEFT has no plugin
discovery, so in a plain ``lm_eval`` process an SADI adapter fails there with ``KeyError: 'SADI'``: nothing has
imported ``sadi_peft``. This sub-command imports ``sadi_peft`` (which registers the type) and then runs lm-eval's
own command line (``lm_eval.__main__.cli_evaluate``) in the same process, with the remaining arguments unchanged::

    sadi-peft lm-eval --model hf \\
        --model_args pretrained=<base>,peft=<adapter_dir>,dtype=float32 \\
        --tasks sadi_copa --include_path <path> --limit 20 --device cpu

For notebooks, :func:`simple_evaluate` does the same for ``lm_eval.simple_evaluate``::

    from sadi_peft.cli.lm_eval import simple_evaluate
    results = simple_evaluate(model="hf", model_args="pretrained=<base>,peft=<adapter_dir>,dtype=float32",
                              tasks=["sadi_copa"], limit=20, device="cpu", batch_size=1)
    results["results"]["sadi_copa"]["acc,none"]

The bundled ``sadi_copa`` task (COPA in the SADI authors' prompt format, read from local JSONL files) lives in
:mod:`sadi_peft.lm_eval_tasks`. lm-eval itself is an optional dependency: ``pip install 'lm-eval==0.4.13'`` (or
``pip install -e '.[lm-eval]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from . import EXIT_FAILED, EXIT_OK, EXIT_USAGE

__all__ = ["LM_EVAL_PIP", "LmEvalMissingError", "check_batching", "register", "run_lm_eval", "simple_evaluate"]

logger = logging.getLogger(__name__)

#: How to install the optional dependency (the version the integration is tested with).
LM_EVAL_PIP = "pip install 'lm-eval==0.4.13'"

_DATA_DIR_ENV = "SADI_DATA_DIR"
_LM_EVAL_SUBCOMMANDS = ("run", "ls", "validate")

_DESCRIPTION = textwrap.dedent(
    """\
    Run lm-evaluation-harness (lm-eval 0.4.13) with SADI adapters loadable.

    lm-eval's `hf` model loads `peft=<adapter>` through PeftModel.from_pretrained, and PEFT has no plugin
    discovery: in a plain `lm_eval` process an SADI adapter fails with KeyError: 'SADI'. This command imports
    sadi_peft (registering the SADI type) and then runs lm-eval's own command line in the same process. Every
    argument it does not know itself is handed to lm-eval unchanged (`run` is implied, as with `lm_eval`;
    `ls` and `validate` work too)."""
)

_EPILOG = textwrap.dedent(
    """\
    example (SADI adapter vs. the same base model without it):
      sadi-peft lm-eval --model hf \\
          --model_args pretrained=<base>,peft=<adapter_dir>,dtype=float32 \\
          --tasks sadi_copa --include_path <path> --limit 20 --device cpu --batch_size 1
      sadi-peft lm-eval --model hf --model_args pretrained=<base>,dtype=float32 \\
          --tasks sadi_copa --include_path <path> --limit 20 --device cpu --batch_size 1

    bundled tasks:
      sadi_copa   COPA in the SADI authors' prompt format, choices " A"/" B", test split (500 items), read
                  from <data_dir>/copa/{train,val,test}.jsonl; never from the Hub.
      Their folder is sadi_peft/lm_eval_tasks (python -c "import sadi_peft.lm_eval_tasks as t; print(t.task_dir())").
      When neither --include_path nor --config is given and a bundled task is named, that folder is added as
      --include_path. <data_dir>: --sadi-data-dir, else $SADI_DATA_DIR, else ../shared/data.

    batching:
      lm-eval scores log-likelihoods on right-padded batches WITHOUT an attention mask, so a positions="last"
      SADI adapter (the default) cannot see where each shorter prompt ends and steers only the longest row of a
      batch. This command therefore refuses such an adapter with --batch_size other than 1
      (--sadi-allow-batching overrides). positions="all" adapters batch freely.

    python (notebooks):
      from sadi_peft.cli.lm_eval import simple_evaluate   # imports sadi_peft, then lm_eval.simple_evaluate
      simple_evaluate(model="hf", model_args="pretrained=<base>,peft=<adapter_dir>", tasks=["sadi_copa"],
                      limit=20, device="cpu", batch_size=1, sadi_data_dir="../shared/data")

    lm-eval is optional: """
    + LM_EVAL_PIP
    + """ (or pip install -e '.[lm-eval]')."""
)


class LmEvalMissingError(ImportError):
    """lm-eval is not installed; the message names the pip command."""


def _require_lm_eval() -> None:
    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise LmEvalMissingError(
            f"lm-evaluation-harness is not installed in this Python environment ({sys.executable}). Install it "
            f"with: {LM_EVAL_PIP}   (or, in a sadi-peft checkout: pip install -e '.[lm-eval]')"
        )


# ------------------------------------------------------------------------------------------- argument helpers
def _option_values(argv: Sequence[str], *names: str) -> list[str]:
    """Values given to any of ``names`` in an lm-eval argument list (``--x v``, ``--x=v``, nargs='+' lists)."""
    values: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        for name in names:
            if token == name:
                j = i + 1
                while j < len(argv) and not argv[j].startswith("-"):
                    values.append(argv[j])
                    j += 1
                break
            if token.startswith(name + "="):
                values.append(token[len(name) + 1 :])
                break
        i += 1
    return values


def _has_option(argv: Sequence[str], *names: str) -> bool:
    return any(token == name or token.startswith(name + "=") for token in argv for name in names)


def _requested_tasks(argv: Sequence[str]) -> list[str]:
    return [name.strip() for value in _option_values(argv, "--tasks", "-t") for name in value.split(",") if name.strip()]


def _model_args(argv: Sequence[str]) -> dict[str, str]:
    """``--model_args`` as a dict (lm-eval accepts ``k=v,k=v``, space-separated ``k=v`` items, or JSON)."""
    result: dict[str, str] = {}
    for value in _option_values(argv, "--model_args", "-a"):
        text = value.strip()
        if text.startswith("{"):
            with contextlib.suppress(ValueError):
                result.update({str(k): str(v) for k, v in json.loads(text).items()})
            continue
        for item in text.split(","):
            if "=" in item:
                key, _, val = item.partition("=")
                result[key.strip()] = val.strip()
    return result


def _sadi_last_position_adapters(peft_path: str) -> list[str]:
    """Names of the SADI adapters with ``positions="last"`` in a local adapter folder (``[]`` when none)."""
    found = []
    root = Path(peft_path).expanduser()
    for config_file in [root / "adapter_config.json", *sorted(root.glob("*/adapter_config.json"))]:
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if str(config.get("peft_type")) == "SADI" and config.get("positions", "last") == "last":
            found.append(str(config_file.parent))
    return found


def check_batching(argv: Sequence[str]) -> Optional[str]:
    """Why this lm-eval argument list would mis-steer an SADI adapter (``None`` when it is fine).

    lm-eval's ``hf`` model scores log-likelihoods on right-padded batches and calls the model without an
    ``attention_mask``; a ``positions="last"`` adapter then takes the last column of the batch as every row's
    prompt end, so only the longest rows of each batch are steered. ``--batch_size 1`` (lm-eval's default) is exact.
    """
    peft_path = _model_args(argv).get("peft")
    if not peft_path:
        return None
    batch = (_option_values(argv, "--batch_size", "-b") or ["1"])[-1].strip()
    if batch == "1":
        return None
    adapters = _sadi_last_position_adapters(peft_path)
    if not adapters:
        return None
    return (
        f"the SADI adapter {adapters[0]} uses positions='last' and --batch_size is {batch!r}. lm-eval scores "
        "log-likelihoods on right-padded batches without an attention mask, so the adapter would steer only the "
        "longest prompt of each batch and the numbers would be wrong. Use --batch_size 1 (exact), a "
        "positions='all' adapter, or pass --sadi-allow-batching to run anyway."
    )


@contextlib.contextmanager
def _environ(name: str, value: Optional[str]) -> Iterator[None]:
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


# ------------------------------------------------------------------------------------------------- running
def run_lm_eval(argv: Sequence[str], *, data_dir: Optional[str | os.PathLike[str]] = None, add_task_dir: bool = True) -> int:
    """Import ``sadi_peft``, then run lm-eval's command line in this process on ``argv``; return its exit code.

    Args:
        argv: lm-eval's arguments, as after ``lm_eval`` on a shell command line.
        data_dir: data folder for the bundled tasks (set as ``$SADI_DATA_DIR`` during the run).
        add_task_dir: add ``--include_path <bundled task folder>`` when a bundled task is requested and neither
            ``--include_path`` nor ``--config`` is given.

    Raises:
        LmEvalMissingError: lm-eval is not installed.
    """
    import sadi_peft  # noqa: F401  - registers the "SADI" PEFT type; the point of this command

    from ..lm_eval_tasks import TASK_NAMES, task_dir
    from ..lm_eval_tasks import utils as task_utils

    _require_lm_eval()
    resolved = str(task_utils.find_data_dir(data_dir)) if data_dir is not None else None
    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    if add_task_dir and not _has_option(argv, "--include_path", "--config", "-C"):
        if any(name in TASK_NAMES for name in _requested_tasks(argv)):
            argv += ["--include_path", str(task_dir())]
            logger.info("Added --include_path %s for the bundled SADI tasks.", task_dir())

    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        with _environ(_DATA_DIR_ENV, resolved):
            cli_evaluate()
    except SystemExit as exit_:  # argparse errors and --help inside lm-eval
        code = exit_.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_FAILED)
    finally:
        sys.argv = saved_argv
    return EXIT_OK


def simple_evaluate(
    *args: Any,
    sadi_data_dir: Optional[str | os.PathLike[str]] = None,
    include_path: Optional[str | os.PathLike[str] | Sequence[str | os.PathLike[str]]] = None,
    **kwargs: Any,
) -> Any:
    """``lm_eval.simple_evaluate`` with ``sadi_peft`` imported first and the bundled tasks available.

    All arguments are ``lm_eval.simple_evaluate``'s (``model``, ``model_args``, ``tasks``, ``limit``, ``device``,
    ``batch_size``, ...), plus:

    Args:
        sadi_data_dir: data folder for the bundled tasks (default ``$SADI_DATA_DIR`` or ``../shared/data``).
        include_path: further task folders; the bundled task folder is always included. Ignored when you pass
            your own ``task_manager``.

    Raises:
        LmEvalMissingError: lm-eval is not installed.

    Note: as on the command line, a ``positions="last"`` SADI adapter is steered exactly only with
    ``batch_size=1`` (see :func:`check_batching`); this function warns otherwise.
    """
    import sadi_peft  # noqa: F401  - registers the "SADI" PEFT type

    _require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    from ..lm_eval_tasks import task_dir
    from ..lm_eval_tasks import utils as task_utils

    model_args = kwargs.get("model_args", args[1] if len(args) > 1 else None)
    batch_size = kwargs.get("batch_size", args[4] if len(args) > 4 else None)
    if isinstance(model_args, dict):
        model_args_str = ",".join(f"{k}={v}" for k, v in model_args.items())
    else:
        model_args_str = model_args or ""
    problem = check_batching(["--model_args", model_args_str, "--batch_size", str(batch_size or 1)])
    if problem:
        logger.warning("sadi_peft simple_evaluate: %s", problem)

    if "task_manager" not in kwargs:
        metadata = (
            simple_parse_args_string(model_args) if isinstance(model_args, str)
            else dict(model_args) if isinstance(model_args, dict) else {}
        ) | (kwargs.get("metadata") or {})
        if sadi_data_dir is not None:
            metadata[task_utils.METADATA_KEY] = str(task_utils.find_data_dir(sadi_data_dir))
        paths = [str(task_dir())]
        if include_path is not None:
            extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
            paths += [os.fspath(p) for p in extra]
        kwargs["task_manager"] = TaskManager(include_path=paths, metadata=metadata)
    return lm_eval.simple_evaluate(*args, **kwargs)


# ------------------------------------------------------------------------------------------------- argparse
def _run(args: argparse.Namespace) -> int:
    extra = list(args.extra)
    if args.lm_eval_help:
        extra = ["run", "--help"]
    elif not extra:
        args.lm_eval_parser.print_help(sys.stderr)
        print("\nsadi-peft lm-eval: error: no lm-eval arguments given (see the example above).", file=sys.stderr)
        return EXIT_USAGE
    if not args.sadi_allow_batching and (not extra or extra[0] not in ("ls", "validate")):
        problem = check_batching(extra)
        if problem:
            print(f"sadi-peft lm-eval: error: {problem}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return run_lm_eval(extra, data_dir=args.sadi_data_dir)
    except LmEvalMissingError as error:
        print(f"sadi-peft lm-eval: error: {error}", file=sys.stderr)
        return EXIT_FAILED


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness with SADI adapters loadable (peft=<adapter>); other arguments go to lm-eval",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # never let an lm-eval option be taken for an abbreviation of ours
        usage="sadi-peft lm-eval [--sadi-data-dir DIR] [--sadi-allow-batching] [--lm-eval-help] LM_EVAL_ARGS ...",
    )
    parser.add_argument(
        "--sadi-data-dir",
        metavar="DIR",
        help="folder holding copa/{train,val,test}.jsonl for the bundled sadi_* tasks "
        "(default: $SADI_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument(
        "--sadi-allow-batching",
        action="store_true",
        help="run a positions='last' SADI adapter with --batch_size other than 1 anyway (mis-steers padded rows)",
    )
    parser.add_argument("--lm-eval-help", action="store_true", help="show lm-eval's own help for `run` and exit")
    parser.set_defaults(func=_run, accepts_extra=True, lm_eval_parser=parser)
