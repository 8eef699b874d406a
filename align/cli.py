"""The ``align`` command. Heavy libraries are imported inside commands, so ``--help`` is instant."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from align import __version__
from align.errors import AlignError, PluginError, Terminated, printable


def _echo(text: str = "", err: bool = False, nl: bool = True) -> None:
    """``click.echo`` of ``text`` with the characters a terminal acts on escaped (ESC, …): what
    align prints holds names and values from configs, topics, plugins and models."""
    click.echo(printable(text), err=err, nl=nl)


def _handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print an :class:`AlignError` as one line and exit non-zero; ``--debug`` keeps the traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        try:
            return command(*args, **kwargs)
        except AlignError as exc:
            if debug:
                raise
            _echo(f"Error: {printable(str(exc), newlines=False)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            what = "Terminated (SIGTERM)" if terminated else "Interrupted"
            # A run that had started says where it is, so it can be resumed as it stands.
            run_dir = getattr(exc, "run_dir", None)
            if run_dir is not None:
                what += (
                    f": results so far are in {run_dir}; `align run --resume {run_dir}` goes on "
                    "from the last finished step"
                )
            _echo(f"\n{what}.", err=True)
            sys.exit(128 + signal.SIGTERM if terminated else 130)

    return wrapper


def _terminate_as_interrupt() -> None:
    """Handle SIGTERM as Ctrl-C is handled: by default it ended the process where it stood, with
    no message and the run's status left "running" in summary.json."""

    def raise_terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


def _check_failures(plugins: Any, strict: bool) -> None:
    """Warn once about each plugin that failed to load, or refuse to go on when ``strict``."""
    for failure in plugins.failures:
        where = failure.distribution or "unknown distribution"
        if failure.version:
            where += f" {failure.version}"
        message = f"plugin '{failure.name}' ({where}) failed to load: {failure.error}"
        if strict:
            raise PluginError(
                f"{message}; fix or uninstall it, or skip it with ALIGN_DISABLE_PLUGINS={failure.name}"
            )
        _echo(f"Warning: {message}; `align plugins` shows it", err=True)


def _warn_shadowing(plugins: Any) -> None:
    """One warning for each built-in component a plugin replaces (it is the plugin's that runs)."""
    for warning in plugins.warnings:
        _echo(f"Warning: {warning}", err=True)


def _load_plan(strict_flag: bool, config: Any, **options: Any) -> tuple[Any, Any]:
    """Load the plugins and resolve the plan; a failed plugin is an error with ``--strict-plugins``
    or the config's ``strict_plugins: true``, else one warning (also when the config then fails,
    since a missing plugin is often why)."""
    from align.core.plan import make_plan
    from align.plugins.manager import load_plugins

    plugins = load_plugins()
    if strict_flag:
        _check_failures(plugins, strict=True)  # before the config, which may name the broken plugin
    try:
        plan = make_plan(plugins.registry, config, **options)
    except AlignError:
        _check_failures(plugins, strict=False)
        _warn_shadowing(plugins)
        raise
    _check_failures(plugins, strict=plan.settings.strict_plugins)
    _warn_shadowing(plugins)
    return plugins, plan


_debug_option = click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
_config_argument = click.argument("config", required=False, type=click.Path())
_plan_options = [
    click.option(
        "--topics",
        type=click.Path(),
        help="A topic file or directory (default: the config's, else the demo's).",
    ),
    click.option(
        "--model",
        help="A local Hugging Face model directory, a .gguf file or a hub id (default: the packaged SmolLM2).",
    ),
    click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config value, e.g. dpo.beta=0.05.",
    ),
    click.option(
        "--output", type=click.Path(), help="The run directory (default: runs/<config name>-<time>)."
    ),
    click.option(
        "--strict-plugins",
        is_flag=True,
        help="Refuse to run when an installed plugin fails to load (config: strict_plugins: true).",
    ),
    _debug_option,
]


def _with_plan_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_plan_options):
        command = option(command)
    return _config_argument(command)


_verbose_option = click.option(
    "--verbose",
    "-v",
    count=True,
    help="Log what align does to stderr: -v model load, adapter and steps with durations; -vv also "
    "checkpoints and the libraries' (transformers, TRL) messages. Default: warnings only.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="align")
@_verbose_option
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Teach a language model a person's knowledge and voice, topic by topic, with one rank-1 LoRA adapter.

    \b
    align run                      the built-in demo (3 topics, SmolLM2-135M-Instruct)
    align run configs/dpo.yaml --topics my_topics/
    align validate my.yaml         resolve and print the plan; trains nothing
    align plugins                  every plugin as JSON
    align new-plugin NAME          a plugin package with tests, ready to pip install
    align topics draft NOTES... --output DIR             topic files drafted from notes
    align eval --adapter runs/<name>/adapters/<topic>    score a saved adapter
    align compare runs/a runs/b    two runs side by side
    align sample --adapter DIR "prompt" --base
    align chat --adapter runs/<name> --base              talk to it, turn by turn
    align merge runs/<name> --output DIR                 a standalone merged model
    align export runs/<name> --output DIR                GGUF for llama.cpp and Ollama
    align report runs/<name> --html                      report.md and plots
    """
    ctx.meta["align.verbose"] = verbose


@cli.command()
@_with_plan_options
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    metavar="RUN_DIR",
    help="Continue the run in RUN_DIR from its last finished step (after a crash, Ctrl-C or a failed step).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
@click.option(
    "--launcher",
    type=click.Choice(["none", "accelerate"]),
    default="none",
    help="accelerate: run on several processes (devices) through `accelerate launch` "
    "(its config from `accelerate config`, or ACCELERATE_CONFIG_FILE); see docs/scaling.md.",
)
@click.option(
    "--num-processes",
    type=click.IntRange(min=1),
    help="With --launcher accelerate: how many processes (default: accelerate's config).",
)
@click.option(
    "--accelerate-config",
    type=click.Path(exists=True, dir_okay=False),
    metavar="FILE",
    help="With --launcher accelerate: accelerate's config file, e.g. configs/accelerate/fsdp.yaml "
    "(default: ACCELERATE_CONFIG_FILE, else the one `accelerate config` wrote).",
)
@_verbose_option
@_handle_errors
def run(
    config,
    topics,
    model,
    overrides,
    output,
    strict_plugins,
    debug,
    resume,
    quiet,
    launcher,
    num_processes,
    accelerate_config,
    verbose,
):
    """Run the protocol over every topic. CONFIG defaults to the built-in demo.

    \b
    align run --resume runs/demo-20261125-101500   continue a killed or stopped run
    align run my.yaml --launcher accelerate --num-processes 8   one process per GPU
    align run my.yaml --launcher accelerate --accelerate-config configs/accelerate/fsdp.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml -m align run my.yaml
    """
    from align.console import ConsoleReporter, configure_logging
    from align.core import distributed

    if launcher == "accelerate":
        sys.exit(_relaunch(num_processes, accelerate_config))
    for option, value in (("--num-processes", num_processes), ("--accelerate-config", accelerate_config)):
        if value is not None:
            raise AlignError(f"{option} goes with --launcher accelerate; add it, or leave {option} out")

    from align.core.runner import execute, resume_plan_options, run_status

    _terminate_as_interrupt()
    main_process = distributed.is_main()
    # One process speaks for a multi-process run; the others only log warnings.
    configure_logging(
        verbose + click.get_current_context().meta.get("align.verbose", 0) if main_process else 0
    )

    try:
        if resume:
            given = [
                flag for flag, value in _resume_conflicts(config, topics, model, overrides, output) if value
            ]
            if given:
                raise AlignError(
                    f"--resume continues {resume} with the config and topics it started with; "
                    f"leave out {', '.join(given)}"
                )
            if run_status(resume) == "completed":
                if main_process:
                    _echo(f"{resume}: the run completed; nothing to resume")
                return
            plugins, plan = _load_plan(strict_plugins, **resume_plan_options(resume))
        else:
            plugins, plan = _load_plan(
                strict_plugins, config, overrides=overrides, topics=topics, model=model, output=output
            )
        reporter = ConsoleReporter(quiet=quiet or not main_process)
        try:
            execute(plan, reporter=reporter, hooks=plugins.manager, resume=bool(resume))
        finally:
            reporter.close()  # the progress bars, also when the run stops
        distributed.shutdown()
    except KeyboardInterrupt as exc:
        if resume and getattr(exc, "run_dir", None) is None:
            exc.run_dir = resume  # type: ignore[attr-defined]  # stopped while loading: still the run
        raise
    except AlignError as exc:
        if not distributed.is_distributed() or (main_process and debug):
            raise
        # Every process stops at the same place (the engine decides failures once): the main one
        # says why, once, and all leave together, so the launcher kills none before it has spoken.
        if main_process:
            _echo(f"Error: {printable(str(exc), newlines=False)}", err=True)
        distributed.setup()
        distributed.shutdown()
        sys.exit(exc.exit_code)


#: ``align run`` options that choose the launcher; the relaunched processes run without them.
_LAUNCHER_OPTIONS = frozenset({"--launcher", "--num-processes", "--accelerate-config"})


def _relaunch(num_processes: int | None, config_file: str | None = None) -> int:
    """Run this same ``align run`` (less the launcher options) under ``accelerate launch``."""
    import subprocess

    return subprocess.call(_launch_command(num_processes, config_file, sys.argv[1:]))


def _launch_command(num_processes: int | None, config_file: str | None, argv: list[str]) -> list[str]:
    """The ``accelerate launch`` command that runs ``align`` with ``argv`` (less the launcher
    options) on ``num_processes`` processes, set up by accelerate's ``config_file``."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise AlignError(
            "--launcher accelerate: the `accelerate` command is not installed; `pip install accelerate`"
        )
    from align import compat

    command = [sys.executable, "-m", compat.accelerate_launch_module()]
    if config_file is not None:
        command += ["--config_file", config_file]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
        if num_processes > 1:
            command += ["--main_process_port", str(_free_port())]
            if not _has_accelerate_config(config_file):
                # accelerate's multi-GPU launcher is torchrun's: on a machine without GPUs each
                # process joins over gloo on the CPU (its --cpu would want MPI instead). With a
                # config, its distributed type decides: --multi_gpu would override FSDP or DeepSpeed.
                command.append("--multi_gpu")
    return [*command, str(RELAUNCH_SCRIPT), *_without_launcher_options(argv)]


#: What the relaunched processes run: ``align`` as a script in a directory of its own, so that a
#: folder named ``align/`` in the working directory cannot shadow the installed package there.
RELAUNCH_SCRIPT = Path(__file__).resolve().parent / "relaunch" / "align_main.py"


def _has_accelerate_config(config_file: str | None) -> bool:
    """Whether ``accelerate launch`` will read a config file: the one given, ACCELERATE_CONFIG_FILE,
    or the one ``accelerate config`` wrote."""
    if config_file is not None or os.environ.get("ACCELERATE_CONFIG_FILE"):
        return True
    from align import compat

    return Path(compat.accelerate_default_config_file()).is_file()


def _without_launcher_options(argv: list[str]) -> list[str]:
    """``argv`` without the launcher options and their values (also written ``--opt=value``)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _LAUNCHER_OPTIONS:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _resume_conflicts(config, topics, model, overrides, output) -> list[tuple[str, Any]]:
    return [
        ("CONFIG", config),
        ("--topics", topics),
        ("--model", model),
        ("--set", overrides),
        ("--output", output),
    ]


@cli.command()
@_with_plan_options
@_handle_errors
def validate(config, topics, model, overrides, output, strict_plugins, debug):
    """Resolve CONFIG and print the plan (config, topics, steps) and check the model path as `align run`
    does; trains nothing and loads no model."""
    from align.console import gates_in_questions, settings_that_do_nothing
    from align.core.config import dump_config
    from align.core.sources import TopicSources
    from align.core.topics import stray_data_files
    from align.hf.source import check_model_path

    plugins, plan = _load_plan(
        strict_plugins, config, overrides=overrides, topics=topics, model=model, output=output
    )
    stray = stray_data_files(plan.settings.topics, TopicSources.from_registry(plugins.registry))
    check_model_path(plan.settings.model.path)  # what the run checks first, without loading it
    _echo(f"# resolved config from {plan.source}")
    _echo(dump_config(plan.config).rstrip())
    _echo("\n# topics")
    for topic in plan.topics:
        _echo(
            f"- {topic.name} ({topic.source}): {len(topic.content)} passages, {len(topic.quiz)} quiz items, "
            f"{len(topic.preference_pairs)} preference pairs, {len(topic.voice_pairs)} voice pairs"
        )
        for field, whose in (
            ("preference_pairs", "the policy's own answers, generated right before DPO"),
            ("voice_pairs", "the bare model's answers, generated before training"),
        ):
            missing = sum(1 for pair in getattr(topic, field) if pair.rejected is None)
            if missing:
                _echo(f"  {topic.source}: {field}: {missing} without rejected; {whose}, take their place")
        for index, item in enumerate(topic.quiz):
            if item.given is not None:  # the file gave the choice's text: say which index it became
                _echo(f"  {topic.source}: quiz[{index}].answer: {item.given!r} is choice {item.answer}")
    _echo("\n# protocol, for each topic")
    for index, step in enumerate(plan.steps, 1):
        _echo(f"{index}. {step.describe()}")
    _echo(f"\n# metrics recorded: {', '.join(plan.metric_names)}")
    lines, warnings = gates_in_questions(plan)
    if lines:
        _echo("\n# gates and rollback guards in quiz questions, for each topic")
        for line in lines:
            _echo(line)
    for warning in [*warnings, *settings_that_do_nothing(plan), *stray]:
        _echo(f"Warning: {warning}", err=True)


@cli.group()
def topics() -> None:
    """Work with topic files: draft them from notes."""


@topics.command("draft")
@click.argument("notes", nargs=-1, required=True, type=click.Path())
@click.option(
    "--output", "-o", required=True, type=click.Path(file_okay=False), help="A new or empty directory."
)
@_debug_option
@_handle_errors
def topics_draft(notes, output, debug):
    """Draft topic files from NOTES for you to review: passages, a cloze quiz, pairs.

    \b
    NOTES are text or markdown files (a topic per top-level heading, else per file; `Q:`/`A:`
    lines become preference pairs), chat exports (a JSON list of {role, content}: your turns are
    the assistant's) and pair files (JSON Lines, CSV, Parquet with prompt and chosen). Pairs
    have no rejected answer: the model's own answers take their place when the run trains.
    Loads no model.

    \b
    align topics draft notes.md interview.json --output topics/
    align validate --topics topics/
    """
    from align.core.sources import TopicSources
    from align.drafting import draft_topics, write_drafts
    from align.plugins.manager import load_plugins

    plugins = load_plugins()
    _check_failures(plugins, strict=False)
    drafted = draft_topics(notes, TopicSources.from_registry(plugins.registry))
    for path, topic in zip(write_drafts(drafted, output), drafted.topics):
        _echo(
            f"wrote {path}: {len(topic.content)} passages, {len(topic.quiz)} quiz questions, "
            f"{len(topic.preference_pairs)} preference pairs, {len(topic.voice_pairs)} voice pairs"
        )
    if drafted.notes:
        _echo("\n# could not draft")
        for note in drafted.notes:
            _echo(f"- {note}")
    _echo(f"\nReview the drafts, then: align validate --topics {output}")


@cli.command()
@_handle_errors
def plugins(debug: bool = False):
    """Print every plugin as JSON: name, distribution, version, hooks, components and load error."""
    from align.plugins.manager import describe_plugins, load_plugins

    loaded = load_plugins()
    for warning in loaded.warnings:  # stderr: stdout stays JSON
        _echo(f"Warning: {warning}", err=True)
    click.echo(json.dumps(describe_plugins(loaded), indent=2))


@cli.command("new-plugin")
@click.argument("name")
@click.option(
    "--kind",
    type=click.Choice(["evaluator", "objective", "gate"]),
    default="evaluator",
    show_default=True,
    help="The kind of component the plugin contributes.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Where to create align-NAME/.",
)
@_debug_option
@_handle_errors
def new_plugin(name, kind, directory, debug):
    """Write a plugin package align-NAME with one working component, tests and a README.

    \b
    align new-plugin keyword-coverage --kind evaluator
    cd align-keyword-coverage && pip install -e . && python -m pytest
    """
    from align.scaffold import new_plugin as scaffold

    path = scaffold(name, kind, directory)
    _echo(f"Created {path} ({kind} '{name.replace('-', '_')}')")
    _echo(f"Next: cd {path} && pip install -e . && python -m pytest")


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _sampling_options(command: Any) -> Any:
    """``--temperature`` and ``--seed``: greedy by default, seeded sampling on request."""
    command = click.option(
        "--seed", type=int, default=0, show_default=True, help="The sampling seed (with --temperature > 0)."
    )(command)
    return click.option(
        "--temperature",
        type=float,
        default=0.0,
        show_default=True,
        help="0 is greedy; above 0 samples (seeded).",
    )(command)


_base_model_option = click.option(
    "--model", help="The base model (default: the adapter's run's model, else the packaged SmolLM2)."
)


@cli.command("eval")
@click.option(
    "--adapter",
    type=click.Path(),
    metavar="DIR",
    help="A saved adapter, e.g. runs/<name>/adapters/<topic> (default: none, the bare model).",
)
@click.option(
    "--topics",
    type=click.Path(),
    help="A topic file or directory (default: the topics of the adapter's run).",
)
@click.option(
    "--evaluators",
    default="quiz,voice",
    show_default=True,
    help="Registered evaluators to score with, comma-separated (`align plugins` lists them).",
)
@_base_model_option
@_json_option
@_debug_option
@_handle_errors
def eval_command(adapter, topics, evaluators, model, as_json, debug):
    """Score a saved adapter (or the bare model) on topics with any registered evaluators.

    \b
    align eval --adapter runs/demo/adapters/home --topics my_topics/
    align eval --topics my_topics/ --evaluators quiz,recall --json
    """
    from align.plugins.manager import load_plugins
    from align.tools import eval_table, evaluate_adapter

    plugins = load_plugins()
    _check_failures(plugins, strict=False)  # a plugin that failed to load may be the one asked for
    _warn_shadowing(plugins)
    names = [name.strip() for name in evaluators.split(",") if name.strip()]
    result = evaluate_adapter(plugins.registry, adapter=adapter, topics=topics, evaluators=names, model=model)
    _echo(json.dumps(result, indent=2) if as_json else eval_table(result))


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path())
@_base_model_option
@_json_option
@_debug_option
@_handle_errors
def questions(run_dir, model, as_json, debug):
    """Show each quiz question's margin for the bare model, after its own topic and at the end of
    the run: which answers the run never learnt, which later topics took, and which hang by a thread.

    \b
    align questions runs/demo
    align questions runs/demo --json
    """
    from align.plugins.manager import load_plugins
    from align.tools.questions import questions_table, run_questions

    plugins = load_plugins()
    _check_failures(plugins, strict=False)
    result = run_questions(plugins.registry, run_dir, model=model)
    _echo(json.dumps(result, indent=2) if as_json else questions_table(result))


@cli.command()
@click.argument("run_a", metavar="RUN_A", type=click.Path())
@click.argument("run_b", metavar="RUN_B", type=click.Path())
@_json_option
@_debug_option
@_handle_errors
def compare(run_a, run_b, as_json, debug):
    """Show two runs' metrics side by side per topic and step, with the difference (b - a).

    \b
    align compare runs/demo-a runs/demo-b
    """
    from align.tools import compare_runs, compare_table

    result = compare_runs(run_a, run_b)
    _echo(json.dumps(result, indent=2) if as_json else compare_table(result))


@cli.command()
@click.option(
    "--adapter",
    required=True,
    type=click.Path(),
    metavar="DIR",
    help="A saved adapter: runs/<name>/adapters/<topic>.",
)
@click.argument("prompt")
@click.option("--base", is_flag=True, help="Also print the bare model's answer.")
@click.option(
    "--max-new-tokens", type=int, default=64, show_default=True, help="The longest answer, in tokens."
)
@_sampling_options
@click.option(
    "--repetition-penalty",
    type=float,
    default=1.0,
    show_default=True,
    help="Above 1 makes the answer less likely to repeat itself (1.1 to 1.5); 1 is none.",
)
@_base_model_option
@_debug_option
@_handle_errors
def sample(adapter, prompt, base, max_new_tokens, temperature, seed, repetition_penalty, model, debug):
    """Answer PROMPT with a saved adapter attached (as a user turn of the chat template).
    An answer that loops (a phrase said over and over) is flagged.

    \b
    align sample --adapter runs/demo/adapters/home "Where do you live?" --base
    align sample --adapter runs/demo/adapters/home "Where do you live?" --repetition-penalty 1.3
    """
    from align.tools import repetition_note
    from align.tools import sample as answer

    answers = answer(
        adapter,
        prompt,
        base=base,
        model=model,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        repetition_penalty=repetition_penalty,
    )
    shown = [("adapter", f"with adapter {adapter}")] + ([("base", "\nbare model")] if base else [])
    for key, title in shown:
        _echo(f"{title}:\n{answers[key]}")
        note = repetition_note(answers[key])
        if note:
            hint = "" if repetition_penalty > 1.0 else "; --repetition-penalty 1.3 discourages it"
            _echo(f"(this answer {note}{hint})")


@cli.command()
@click.option(
    "--adapter",
    required=True,
    type=click.Path(),
    metavar="DIR_OR_RUN",
    help="A saved adapter (runs/<name>/adapters/<topic>) or a run directory (its last topic's adapter).",
)
@click.option("--base", is_flag=True, help="Also show the bare model's answer each turn.")
@click.option("--system", help="A system message at the start of the conversation.")
@click.option(
    "--max-new-tokens", type=int, default=256, show_default=True, help="The longest answer, in tokens."
)
@_sampling_options
@_base_model_option
@_debug_option
@_handle_errors
def chat(adapter, base, system, max_new_tokens, temperature, seed, model, debug):
    """Talk to a trained adapter, turn by turn, through the model's chat template; answers stream.

    In a terminal, type a message after `you>`; /reset forgets the conversation, /quit (or Ctrl-D)
    ends it. From a pipe, each line is a turn, and the chat ends with the input.

    \b
    align chat --adapter runs/demo --base
    printf 'Where do you live?\\nAnd your donkey?\\n' | align chat --adapter runs/demo/adapters/home
    """
    from align.chat import Chat, resolve_adapter, run_chat
    from align.tools import check_generation_options, load

    check_generation_options(max_new_tokens, temperature)
    path = resolve_adapter(adapter)
    loaded = load(path, model)
    session = Chat(
        loaded, system=system, base=base, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    interactive = sys.stdin.isatty()

    def write(text: str) -> None:
        _echo(text, nl=False)
        sys.stdout.flush()

    if interactive:
        _echo(
            f"align chat: {path} on {loaded.settings['path']}; /reset forgets the conversation, /quit ends it",
            err=True,
        )
    run_chat(session, _terminal_lines() if interactive else sys.stdin, write, interactive=interactive)


def _terminal_lines():
    """Lines typed at the ``you>`` prompt (with line editing where readline exists), until Ctrl-D."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() edits lines once it is imported)
    while True:
        try:
            yield input("you> ")
        except EOFError:
            click.echo()
            return


def _run_adapter_options(verb: str, output_help: str, *order: Any) -> Callable[[Any], Any]:
    """``--output`` (required), ``--topic`` and ``--model`` of a command that writes a run's adapter
    out (``merge``, ``export``), listed in ``order``: their names, and any other option between them."""
    options = {
        "output": click.option("--output", required=True, type=click.Path(), metavar="DIR", help=output_help),
        "topic": click.option(
            "--topic", help=f"Whose adapter to {verb} (default: the last topic's, the run's final adapter)."
        ),
        "model": click.option("--model", help="The base model (default: the run's model)."),
    }

    def decorate(command: Any) -> Any:
        for option in reversed(order):  # click lists the options in the order they decorate, top down
            command = (options[option] if isinstance(option, str) else option)(command)
        return command

    return decorate


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path())
@_run_adapter_options("merge", "Where to save the model (new or empty).", "topic", "output", "model")
@_debug_option
@_handle_errors
def merge(run_dir, topic, output, model, debug):
    """Merge a run's adapter into its base model and save a standalone Hugging Face model.

    \b
    align merge runs/demo --output merged/ilse
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('merged/ilse')"
    """
    from align.tools import merge as merge_adapter
    from align.tools import run_adapter

    adapter = run_adapter(run_dir, topic)
    path = merge_adapter(adapter, output, model=model)
    _echo(f"Merged {adapter} into the base model: {path} (safetensors, tokenizer, chat template)")


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path())
@click.option(
    "--format",
    "fmt",
    default="gguf",
    show_default=True,
    metavar="FORMAT",
    help="gguf: the merged model as model.gguf with an Ollama Modelfile; gguf-lora: the adapter alone "
    "as llama.cpp's LoRA adapter.gguf (for llama-cli --lora with the base model's GGUF).",
)
@_run_adapter_options(
    "export",
    "Where to write (new or empty).",
    "output",
    "topic",
    click.option(
        "--quantize",
        metavar="TYPE",
        help="The weights' type: f16 (default), q8_0, bf16, f32, q5_1, q5_0, q4_1, q4_0; gguf-lora: f16, f32.",
    ),
    "model",
)
@_debug_option
@_handle_errors
def export(run_dir, fmt, output, topic, quantize, model, debug):
    """Export a run's adapter for llama.cpp, Ollama and LM Studio: a GGUF file and a model card.

    \b
    align export runs/demo --output export/ilse                 model.gguf (f16), Modelfile, README.md
    align export runs/demo --output export/ilse-q8 --quantize q8_0
    cd export/ilse && ollama create ilse -f Modelfile && ollama run ilse
    align export runs/demo --format gguf-lora --output export/ilse-lora
    """
    from align.export import check_options
    from align.export import export as write_export

    check_options(fmt, quantize)
    path = write_export(run_dir, output, fmt=fmt, topic=topic, quantize=quantize, model=model)
    written = ", ".join(sorted(p.name for p in path.iterdir()))
    _echo(f"Exported {run_dir} ({fmt}, {quantize or 'f16'}): {path} ({written})")


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path())
@click.option("--html", "html_report", is_flag=True, help="Also write report.html, images embedded.")
@click.option("--no-samples", is_flag=True, help="Skip the sample answers (loads no model).")
@_debug_option
@_handle_errors
def report(run_dir, html_report, no_samples, debug):
    """Write report.md and PNG plots (plots/) into RUN_DIR: metrics before and after, loss
    curves, the gate timeline, the forgetting matrix, and sample answers.

    \b
    align report runs/demo --html
    """
    from align.report import write_report

    for path in write_report(run_dir, html_report=html_report, samples=not no_samples):
        _echo(f"wrote {path}")


def main() -> None:
    cli(prog_name="align")
