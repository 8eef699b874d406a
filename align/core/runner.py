"""Running a plan for real: seed, output directory, model and adapter, then the engine."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import gc
import importlib.metadata
import json
import logging
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from align.core import distributed
from align.core.checkpoint import Checkpoints, check_settings
from align.core.config import demo_config_path, demo_dir, dump_config
from align.core.engine import Engine, Reporter
from align.core.plan import Plan
from align.core.rundir import RunDir
from align.core.topics import Topic
from align.errors import AlignError

logger = logging.getLogger(__name__)

LIBRARIES = ("mindprint-align", "torch", "transformers", "peft", "trl", "datasets", "evaluate", "pluggy")


def run_name(plan: Plan) -> str:
    """The config's ``name``, else the config file's name and the time; ``align run --topics
    mine/`` without a config is named after its topics (``mine-<time>``), not the demo's."""
    if plan.settings.name:
        return plan.settings.name
    stem = Path(plan.source).stem if plan.source else "run"
    if plan.source == str(demo_config_path()) and Path(plan.settings.topics) != demo_dir() / "topics":
        stem = Path(plan.settings.topics).stem or stem
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}"


def output_dir(plan: Plan) -> Path:
    if plan.settings.output:
        return Path(plan.settings.output)
    return Path("runs") / run_name(plan)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def quiet_libraries() -> None:
    """Keep the libraries' own progress bars and notices out of align's output (see
    :func:`align.hf.loading.quiet_libraries`)."""
    from align.hf.loading import quiet_libraries as quiet

    quiet()


def load_policy(plan: Plan, scratch_dir: Path, tensorboard_dir: Path | None = None) -> Any:
    """The real model with the run's one rank-1 adapter, as the engine's policy; with
    ``tensorboard_dir``, the trainers also write TensorBoard event files there."""
    from align.hf.loading import attach_adapter, load_model, set_seed
    from align.hf.policy import EnginePolicy

    model_cfg, lora = plan.settings.model, plan.settings.lora
    started = time.perf_counter()
    logger.info("loading model %s (dtype %s)", model_cfg.path, model_cfg.dtype)
    model, tokenizer = load_model(
        model_cfg.path,
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        chat_template=model_cfg.chat_template,
        source=plan.source,
        quantization=model_cfg.quantization,
        device_map=model_cfg.device_map,
    )
    logger.info("model loaded in %.1fs", time.perf_counter() - started)
    # Loading may draw random numbers (the first use of the default model converts it, building a
    # model from its config), so the adapter's initial weights come from a seed set here: the
    # same seed gives the same adapter, whether or not this run converted the model.
    set_seed(plan.settings.seed)
    peft_model = attach_adapter(
        model,
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        source=plan.source,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
    )
    logger.info(
        "adapter attached: rank %s, alpha %s, dropout %s, on %s",
        lora.rank,
        lora.alpha,
        lora.dropout,
        ", ".join(lora.target_modules),
    )
    if distributed.lockstep():
        from align.hf.training import shard_model

        peft_model = shard_model(peft_model)
        logger.info("model sharded across %d processes (FSDP)", distributed.world_size())
    return EnginePolicy(
        peft_model,
        tokenizer,
        seed=plan.settings.seed,
        scratch_dir=scratch_dir,
        eval_batch_size=model_cfg.eval_batch_size,
        tensorboard_dir=tensorboard_dir,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        report_to=plan.settings.trackers,
    )


def _computing(plan: Plan, reporter: Reporter | None) -> contextlib.AbstractContextManager[None]:
    """Set the run's compute threads, warn when other align runs already compute on this machine,
    and say that this one does for as long as the returned context lasts (align/core/machine.py)."""
    from align.core import machine
    from align.hf.loading import set_threads
    from align.hf.source import cache_root

    threads, cores = set_threads(plan.settings.threads), machine.cores()
    logger.info("computing with %d threads on %d cores", threads, cores)
    if distributed.is_distributed():
        return contextlib.nullcontext()  # the launcher shares the machine out between its processes
    running = cache_root() / machine.RUNNING_DIR
    message = machine.crowding(threads, machine.others(running), cores)
    if message is not None:
        if reporter is not None:
            reporter.warning(message)
        else:
            logger.warning(message)
    return machine.registered(threads, running)


def execute(
    plan: Plan,
    reporter: Reporter | None = None,
    policy: Any = None,
    hooks: Any = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``plan``; with no ``policy``, load the configured model and attach the adapter.

    ``hooks`` is the plugin manager whose lifecycle hooks watch the run. With ``resume``, the run
    directory already holds a run of this plan, which goes on from its last checkpoint.

    Everything that can fail on bad input (output directory, model, target modules) is checked
    before the run directory is created, so a failed start leaves nothing behind.

    Under a multi-process launch every process runs this (see :mod:`align.core.distributed`):
    all of them check the run directory and read the checkpoint before the main process writes
    anything, and only the main process writes.
    """
    distributed.check_launch()
    distributed.setup()
    rundir = RunDir(output_dir(plan))
    checkpoints = Checkpoints(rundir.checkpoint_dir, policy)
    if resume:
        rundir.check_no_links_out()
        rundir.check_lock_file()
    state = checkpoints.read_state() if resume else None
    if state is not None:
        check_settings(state, plan.config, rundir.path / "config.yaml")
        rundir.check_metrics(
            checkpoints.field(state, "metrics_offset", int, "a number of bytes"),
            checkpoints.field(state, "metrics_sha256", (str, type(None)), "a sha256 digest", None),
        )
    if not resume:
        rundir.check_writable()
    distributed.barrier()  # every process has seen the directory as it was before the main one writes
    sharing = contextlib.nullcontext()
    if policy is None:
        quiet_libraries()
        from align.hf.loading import set_seed

        sharing = _computing(plan, reporter)
        set_seed(plan.settings.seed)
        trackers = plan.settings.trackers
        tensorboard = rundir.path / "tensorboard" if "tensorboard" in trackers else None
        policy = load_policy(plan, rundir.scratch_dir, tensorboard)
        checkpoints.policy = policy
    if resume:
        rundir.reopen(state["metrics_offset"] if state is not None else 0)
    else:
        recorded = dict(plan.config)
        recorded["output"] = str(rundir.path)
        _start(rundir, _config_header() + dump_config(recorded), [t.to_dict() for t in plan.topics])
    checkpoint = checkpoints.load(state) if state is not None else None
    engine = Engine(
        plan,
        policy,
        rundir,
        reporter,
        environment=library_versions(),
        hooks=hooks,
        resume=checkpoint,
        seed_step=policy.reseed,
    )
    try:
        with sharing, _long_lived():
            return engine.run()
    except KeyboardInterrupt as exc:
        exc.run_dir = rundir.path  # type: ignore[attr-defined]  # the CLI names it in its message
        raise
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise AlignError(
            f"{rundir.path}: could not write {exc.filename or 'to the run directory'}: {exc.strerror}; "
            f"results up to the last finished step are kept: fix that, then `align run --resume {rundir.path}`"
        ) from exc
    finally:
        if rundir.writer:
            shutil.rmtree(rundir.scratch_dir, ignore_errors=True)


@contextlib.contextmanager
def _long_lived() -> Iterator[None]:
    """Keep what is loaded by the time the run starts (the libraries' modules, the model, the
    topics) out of the garbage collector's full passes until it ends.

    The trainers ask for a full pass each time they start training (accelerate's ``free_memory``,
    at every SFT and DPO step of every topic), and Python makes its own as objects pile up: over
    the half a million objects the imports and the model leave, each pass took 0.24 s on the 2-core
    machine (docs/performance.md), for nothing, since they live as long as the run. One pass first
    frees what loading left behind, so no garbage is frozen; frozen objects are still freed when
    their last reference goes, and only cycles among them wait for the end of the run. A caller's
    own freeze (``gc.freeze()`` before the run) is left as it was.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: Errors writing files that the user can fix: disk full, over quota, no permission, read-only.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def _start(rundir: RunDir, config_yaml: str, topics: list[dict[str, Any]]) -> None:
    """Create the run directory; when that fails part-way, leave nothing behind."""
    existed = rundir.path.exists()
    try:
        rundir.create(config_yaml, topics=topics)
    except OSError as exc:
        rundir.close()
        if existed:  # it was empty (check_writable): empty it again
            for child in rundir.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(rundir.path, ignore_errors=True)
        if exc.errno not in WRITE_ERRNOS:
            raise
        where = Path(exc.filename).name if exc.filename else "the run directory"
        raise AlignError(
            f"{rundir.path}: could not start the run: {exc.strerror} writing {where}; "
            "nothing was kept: fix that and run again"
        ) from exc


def _config_header() -> str:
    """Comment lines atop the recorded ``config.yaml``: what produced the run."""
    versions = ", ".join(f"{name} {version}" for name, version in library_versions().items())
    return f"# recorded by align at the start of the run; versions: {versions}\n"


def resume_plan_options(path: str | Path) -> dict[str, Any]:
    """What ``align run --resume PATH`` plans from: the run's recorded config and topics.

    Raises :class:`AlignError` when ``path`` is not a run directory that can be resumed.
    """
    rundir = RunDir(path)
    config = rundir.path / "config.yaml"
    if not config.is_file():
        raise AlignError(
            f"{rundir.path}: not a run directory (no config.yaml); give the directory `align run` wrote"
        )
    if not rundir.topics_path.is_file():
        raise AlignError(
            f"{rundir.path}: no topics.json, so the run cannot be resumed (it was started by an older align)"
        )
    try:
        data = json.loads(rundir.topics_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AlignError(f"{rundir.topics_path}: unreadable ({exc}); the run cannot be resumed") from exc
    if not isinstance(data, list):
        raise AlignError(
            f"{rundir.topics_path}: holds {json.dumps(data)[:40]}, not the list of topics the run "
            "trains on; the run cannot be resumed: restore it from a copy of the run, or start a new run"
        )
    topics = [Topic.from_dict(item, f"{rundir.topics_path}[{i}]") for i, item in enumerate(data)]
    return {"config": config, "topics": topics, "output": str(rundir.path)}


def run_status(path: str | Path) -> str | None:
    """The status of the run in ``path`` as its last checkpoint says (``completed``, …), if any."""
    state = Checkpoints(RunDir(path).checkpoint_dir, None).read_state()
    return None if state is None else state["status"]
