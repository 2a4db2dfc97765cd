"""The ``projq-train`` command line.

- ``projq-train fit|validate|test --config recipe.yaml``: LightningCLI over :class:`ProjQModule`
  and a data module (``data: class_path: ...``); ``--print_config`` shows the full recipe.
- ``projq-train quantize --config recipe.yaml`` calibrates and quantizes a model and writes a
  content-addressed artifact (reused when one with the same hash exists).
- ``projq-train export --ckpt_path CKPT --format {peft,merged,quantized} --output DIR`` writes
  an export of a fit checkpoint and checks it against the trained model.
- ``projq-train eval --tasks wikitext2 boolq ... (--ckpt_path C | --artifact A | --model M)``
  scores one model; ``projq-train report --ckpt_path C --tasks ... --output DIR`` writes the
  recovery report (float → quantized → initialized → fine-tuned).
- ``projq-train estimate --config recipe.yaml [--json] [--device_memory 24GB]`` predicts the peak
  memory of ``fit`` and ``quantize`` per process from the model config alone
  (:mod:`projq_train.estimate`).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
from importlib import import_module
from pathlib import Path
from typing import Any, NoReturn

import jsonargparse
import yaml
from jsonargparse import Namespace

from projq_train.config import (
    AdapterConfig,
    CalibrationConfig,
    ModelConfig,
    QuantConfig,
    renamed_setting_hint,
)
from projq_train.quiet import silence_known_noise

TRAINER_SUBCOMMANDS = ("fit", "validate", "test")
# imported when the subcommand runs: a command loads only what it uses (quantize: no Lightning, no peft)
FUNCTION_SUBCOMMANDS = {
    "export": "projq_train.export:run_export",
    "eval": "projq_train.eval.run:run_eval",
    "report": "projq_train.eval.run:run_report",
}
SUBCOMMANDS = (*TRAINER_SUBCOMMANDS, "quantize", "estimate", *FUNCTION_SUBCOMMANDS)
SUBCOMMAND_HELP = {
    "fit": "fine-tune adapters on a quantized base: --config recipe.yaml [--section.key value ...]",
    "validate": "validation loss and perplexity of a checkpoint: --config recipe.yaml --ckpt_path C",
    "test": "test loss and perplexity of a checkpoint: --config recipe.yaml --ckpt_path C",
    "quantize": "quantize a model and write its artifact (or find it): --config recipe.yaml",
    "estimate": "predict the peak memory of fit and quantize from the model config alone",
    "export": "write a checkpoint as a peft adapter, a merged model or a GPTQ-layout model",
    "eval": "score a checkpoint, an artifact or a model on perplexity, commonsense and math",
    "report": "the recovery report: float, quantized, initialized and fine-tuned, side by side",
}


# Recipe settings that name a file or folder, by the last part of their key (a key means one thing
# in every subcommand). Relative ones in a recipe file resolve against the file's directory.
LOCAL_PATH_KEYS = frozenset(
    {
        "default_root_dir",
        "dirpath",
        "save_dir",
        "artifact_dir",
        "data_root",
        "ckpt_path",
        "output",
        "artifact",
    }
)
HUB_OR_LOCAL_KEYS = frozenset({"name_or_path", "dataset", "path", "val_path", "test_path", "model"})
CHECKPOINT_ALIASES = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt", ".csv", ".gguf", ".safetensors", ".ckpt")


def looks_local(value: str, base: Path) -> bool:
    """Whether a model or dataset setting names a local path rather than a hub name: it starts
    with ``.``, ``/`` or ``~``, ends in a file suffix, or exists under ``base``; ``builtin:...``
    and URLs never."""
    if ":" in value:
        return False
    return value.startswith((".", "/", "~")) or value.endswith(LOCAL_SUFFIXES) or (base / value).exists()


def resolve_recipe_paths(settings: Any, base: Path) -> Any:
    """``settings`` (a recipe's parsed YAML) with every relative path made absolute against
    ``base``: the values of :data:`LOCAL_PATH_KEYS`, and of :data:`HUB_OR_LOCAL_KEYS` where they
    :func:`looks_local`. Other values, hub names and checkpoint aliases are kept."""
    if isinstance(settings, list):
        return [resolve_recipe_paths(item, base) for item in settings]
    if not isinstance(settings, dict):
        return settings
    resolved = {}
    for key, value in settings.items():
        if isinstance(value, str) and (
            (key in LOCAL_PATH_KEYS and value not in CHECKPOINT_ALIASES)
            or (key in HUB_OR_LOCAL_KEYS and looks_local(value, base))
        ):
            value = str((base / Path(value).expanduser()).resolve())
        resolved[key] = resolve_recipe_paths(value, base)
    return resolved


class RecipeParsing:
    """What every projq-train parser does: a recipe file's relative paths resolve against the
    file's directory (:func:`resolve_recipe_paths`), so a recipe works from any working directory
    (values on the command line stay relative to the working directory), and a bad option or
    setting is its error line first (:func:`error_line_first`)."""

    def parse_path(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Namespace:
        content = Path(path).read_text()
        try:
            settings = yaml.safe_load(content)
        except yaml.YAMLError:  # jsonargparse's own parse of the text reports it
            settings = None
        if isinstance(settings, dict):
            content = yaml.safe_dump(
                resolve_recipe_paths(settings, Path(path).resolve().parent), sort_keys=False
            )
        return self.parse_string(content, os.path.basename(path), *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        error_line_first(self, message, ex)


# where jsonargparse's messages name a setting it refused (and the value, for a bad choice)
UNKNOWN_SETTING = (
    re.compile(r"unrecognized arguments: --(?P<key>[\w.]+)"),
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"Subcommand '\w+' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(
        r'Parser key "(?P<key>[\w.]+)":\s+Expected a typing\.Literal.*Got value: (?P<value>\S+)',
        re.S,
    ),
)


def parser_keys(parser: jsonargparse.ArgumentParser) -> list[str]:
    """Every setting ``parser`` and its subcommands' parsers accept, e.g. ``model.quant.bits``."""
    keys, parsers = [], [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:  # jsonargparse lists nested settings only here
            if getattr(action, "_name_parser_map", None):  # subcommands
                parsers += action._name_parser_map.values()
            elif action.dest and action.dest not in ("help", "config"):
                keys.append(action.dest)
    return keys


def setting_hint(parser: jsonargparse.ArgumentParser, message: str) -> str:
    """For an error about one setting: the setting's new name if it was renamed, else the
    closest setting the parser accepts (``"; did you mean model.quant.bits?"``), else ``""``."""
    for pattern in UNKNOWN_SETTING:
        if (found := pattern.search(message)) is None:
            continue
        found = found.groupdict()
        key = f"{found['group']}.{found['key']}" if found.get("group") else found["key"]
        if hint := renamed_setting_hint(key, found.get("value")):
            return f"; {hint}"
        if "value" in found:  # a value that is not one of the choices: the message lists them
            return ""
        keys, (parent, _, name) = parser_keys(parser), key.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
        if close := difflib.get_close_matches(name, siblings, n=1, cutoff=0.75):  # a misspelled name
            return f"; did you mean {siblings[close[0]]}?"
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.9)  # a misspelled section
        return f"; did you mean {close[0]}?" if close else ""
    return ""


def error_line_first(
    parser: jsonargparse.ArgumentParser, message: str, ex: Exception | None = None
) -> NoReturn:
    """A bad option or setting: its error line first (with the new name of a renamed setting, or
    the closest setting for a misspelled one) and a pointer to ``--help``, not the usage."""
    if not parser.exit_on_error:  # jsonargparse trying alternatives: it catches this
        jsonargparse.ArgumentParser.error(parser, message, ex)
    hint = setting_hint(parser, message)
    parser = getattr(ex, "subcommand_parser", None) or parser
    prog = parser.prog.replace(" [options]", "")
    prog = f"{prog} <subcommand>" if prog == "projq-train" else prog  # the root parser's error
    sys.stderr.write(f"error: {message}{hint}\n({prog} --help lists every option)\n")
    sys.exit(2)


class ArgumentParser(RecipeParsing, jsonargparse.ArgumentParser):
    """jsonargparse's parser with :class:`RecipeParsing`."""


def usage() -> str:
    """The top-level help: every subcommand with one line."""
    lines = [
        "usage: projq-train <subcommand> [options]   (<subcommand> --help: its options)",
        "",
    ]
    lines += [f"  {name:<9} {SUBCOMMAND_HELP[name]}" for name in SUBCOMMANDS]
    lines += ["", "  --verbose  anywhere: show every third-party warning (known noise is filtered)"]
    return "\n".join(lines)


def quantize_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="projq-train quantize", description="Quantize a model and write an artifact."
    )
    parser.add_argument("--config", action="config", help="recipe YAML")
    parser.add_class_arguments(ModelConfig, "model")
    parser.add_class_arguments(QuantConfig, "quant")
    parser.add_argument(
        "--adapter.rank",
        type=int,
        default=32,
        help="rank of the adapters the artifact is made for: the quantizer shapes its error for, and "
        "computes its compensation at, this rank (0: no compensation)",
    )
    parser.add_class_arguments(CalibrationConfig, "calibration")
    parser.add_argument("--artifact_dir", type=str, default="artifacts", help="root directory of artifacts")
    parser.add_argument(
        "--device", type=str, default="auto", help="compute device: auto, cpu, cuda, cuda:1, ..."
    )
    return parser


def parse_recipe(parser: ArgumentParser, argv: list[str]) -> tuple[Namespace, Namespace]:
    """Parse and validate: returns the raw namespace and the one with dataclasses instantiated."""
    cfg = parser.parse_args(argv)
    try:
        return cfg, parser.instantiate(cfg)
    except ValueError as e:
        parser.error(str(e))


def run_quantize(cfg: Namespace) -> Path:
    """Stream, calibrate and quantize per the recipe (or find the artifact); return its directory."""
    from projq_train.artifact import find_or_quantize
    from projq_train.models import resolve_device

    if cfg.quant.method == "nf4":
        raise ValueError(
            "quant.method nf4 is quantized by bitsandbytes when `fit` loads the model; nothing to do"
        )
    rank = AdapterConfig(rank=cfg.adapter.rank).rank  # checked as fit checks it
    device = resolve_device(cfg.device)
    return find_or_quantize(cfg.model, cfg.quant, rank, cfg.calibration, cfg.artifact_dir, device)


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to the command line."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if not verbose:
        silence_known_noise()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in SUBCOMMANDS:
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"projq-train: error: unknown subcommand '{argv[0]}'{hint}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_subcommand(argv)
    except Exception as err:  # one line; the traceback only with --verbose
        if verbose:
            raise
        sys.exit(f"error: {err or type(err).__name__} (--verbose shows where)")


def run_subcommand(argv: list[str]) -> None:
    # `--help` shows each recipe field's docstring (config.py documents every one)
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    if argv[0] in TRAINER_SUBCOMMANDS:
        from projq_train.lightning_cli import trainer_cli

        trainer_cli(argv)
        return
    if argv[0] == "estimate":
        from projq_train.estimate import main as estimate

        estimate(argv[1:])
        return
    if argv[0] in FUNCTION_SUBCOMMANDS:
        module, _, name = FUNCTION_SUBCOMMANDS[argv[0]].partition(":")
        function = getattr(import_module(module), name)
        parser = ArgumentParser(prog=f"projq-train {argv[0]}", description=function.__doc__)
        parser.add_argument("--config", action="config", help="YAML file with these options")
        parser.add_function_arguments(function, as_positional=False)
        args = parser.parse_args(argv[1:]).as_dict()
        args.pop("config", None)
        try:
            result = function(**args)
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")
        if argv[0] == "export":
            print(json.dumps(result, indent=2))
        return
    parser = quantize_parser()
    _, cfg = parse_recipe(parser, argv[1:])
    path = run_quantize(cfg)
    print(json.dumps({"artifact": str(path)}))


if __name__ == "__main__":
    main()
