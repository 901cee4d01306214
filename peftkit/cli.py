"""The ``peftkit`` command: one verb per job (train, merge, predict, eval, estimate, validate, ...)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from peftkit.errors import EXIT_USER_ERROR


def _lazy(module: str, function: str = "main") -> Callable[[list[str]], int]:
    """Import a verb's module only when it runs, so `peftkit --help` stays instant."""

    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(f"peftkit.{module}"), function)(argv)

    return run


# Each verb lives in the module of its concern and exposes `<function>(argv) -> exit code`.
VERBS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_lazy("train"), "fine-tune from a YAML config (same as `python peftkit/train.py`)"),
    "merge": (_lazy("merge", "cli_main"), "merge adapter(s) into the base model, verify, save a plain Transformers model"),
    "predict": (_lazy("inference", "predict_main"), "label texts or images with a merged model or a run"),
    "eval": (_lazy("inference", "eval_main"), "accuracy, macro-F1, per-class report and confusion matrix on a data set"),
    "estimate": (_lazy("memory", "cli_main"), "estimate peak training memory of a config; plan what fits a budget"),
    "validate": (_lazy("dryrun", "cli_main"), "dry run on the meta device: the plan, without loading weights"),
    "report": (_lazy("report", "cli_main"), "plots and a markdown summary of a run"),
    "configs": (_lazy("dryrun", "configs_main"), "list the shipped configs"),
    "demo": (_lazy("demo", "cli_main"), "the offline demo: LoRA vs. linear probe on MiniLM + Rotten Tomatoes"),
}


def usage() -> str:
    """The verb list shown for `peftkit` and `peftkit --help`."""
    width = max(len(v) for v in VERBS)
    lines = ["usage: peftkit VERB [options]   (peftkit VERB --help for each)", ""]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``peftkit VERB ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"peftkit: error: unknown verb `{verb}`.\n\n{usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    return VERBS[verb][0](rest)


if __name__ == "__main__":
    sys.exit(main())
