"""``sadi-peft push ADAPTER_DIR REPO_ID``: publish a saved SADI adapter to the Hugging Face Hub with a SADI card.

Reads the saved adapter folder only (``adapter_config.json`` and the ``sadi_mask`` / ``sadi_scores`` tensors of
``adapter_model.safetensors``); no model is loaded. Writes the card from ``hub_cards/adapter_card.md`` and uploads
the folder with ``HfApi().create_repo`` + ``upload_folder`` (see :func:`sadi_peft.hub.push_to_hub`).
``--dry-run OUT_DIR`` writes the exact folder that would be uploaded and uploads nothing (no token needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import EXIT_FAILED, EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="publish a saved SADI adapter to the Hugging Face Hub with a SADI model card",
        description=(
            "Publish a saved SADI adapter folder to the Hugging Face Hub as REPO_ID, with a model card stating the "
            "variant, K, delta and gain, the position regime, the selected units, the calibration data and how to "
            "load it (import sadi_peft first). Needs a token (hf auth login, or HF_TOKEN) unless --dry-run."
        ),
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder of a saved SADI adapter")
    parser.add_argument("repo_id", metavar="REPO_ID", help="target Hub repo, 'user-or-org/name'")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--adapter-name", default=None,
                        help="subfolder of ADAPTER_DIR holding the adapter, when it holds several")
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the base model, written to adapter_config.json and the card (use it when "
                             "the adapter records a local path)")
    parser.add_argument("--dataset", default=None,
                        help="calibration data: a Hub dataset id (linked in the card) or a short description")
    parser.add_argument("--results", default=None, metavar="RESULTS_JSON",
                        help="JSON file with baseline vs steered numbers for the card's evaluation table: "
                             '{"task": ..., "metric": ..., "n": ..., "baseline": ..., "steered": ...}, a list of '
                             "those, or {task: {...}}")
    parser.add_argument("--license", default=None, help="license id for the card metadata (e.g. apache-2.0)")
    parser.add_argument("--title", default=None, help="card title")
    parser.add_argument("--description", default=None, help="one sentence on what the adapter is for")
    parser.add_argument("--tag", action="append", default=[], dest="tags", help="extra tag (repeatable)")
    parser.add_argument("--commit-message", default=None, help="commit message of the upload")
    parser.add_argument("--dry-run", default=None, metavar="OUT_DIR",
                        help="write the folder that would be uploaded to OUT_DIR and upload nothing")
    parser.set_defaults(func=run)


def _read_results(path: str):
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--results {path}: no such file.")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"--results {path} is not valid JSON: {error}") from None


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import DEFAULT_COMMIT_MESSAGE, HubLoginError, push_to_hub

    adapter_dir = Path(args.adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"ADAPTER_DIR {adapter_dir} is not a folder: expected a saved SADI adapter.")
    results = _read_results(args.results) if args.results else None
    try:
        outcome = push_to_hub(
            adapter_dir,
            args.repo_id,
            adapter_name=args.adapter_name,
            token=args.token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
            base_model=args.base_model,
            dataset=args.dataset,
            results=results,
            license=args.license,
            title=args.title,
            description=args.description,
            tags=args.tags,
            dry_run_dir=args.dry_run,
        )
    except (HubLoginError, HfHubHTTPError) as error:
        print(f"sadi-peft push: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if args.dry_run:
        files = sorted(p.relative_to(outcome).as_posix() for p in Path(outcome).rglob("*") if p.is_file())
        print(f"Dry run: nothing uploaded. The folder that would be uploaded to {args.repo_id} is {outcome}:")
        for name in files:
            print(f"  {name}")
    else:
        print(f"Uploaded to https://huggingface.co/{args.repo_id}: {outcome}")
    return EXIT_OK

