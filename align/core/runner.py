"""Running a plan for real: seed, output directory, model and adapter, then the engine."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import logging
import os
import platform
import shutil
import warnings
from pathlib import Path
from typing import Any

from align.core.config import dump_config
from align.core.engine import Engine, Reporter
from align.core.plan import Plan
from align.core.rundir import RunDir

LIBRARIES = ("mindprint-align", "torch", "transformers", "peft", "trl", "datasets", "evaluate", "pluggy")


def run_name(plan: Plan) -> str:
    if plan.config.get("name"):
        return plan.config["name"]
    stem = Path(plan.source).stem if plan.source else "run"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}"


def output_dir(plan: Plan) -> Path:
    if plan.config.get("output"):
        return Path(plan.config["output"])
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
    """Keep the libraries' own progress bars and notices out of align's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference log-prob pass reads this
    # Deprecation notices from inside transformers/TRL are for their authors, not align's users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


def load_policy(plan: Plan, scratch_dir: Path) -> Any:
    """The real model with the run's one rank-1 adapter, as the engine's policy."""
    from align.core.model import EnginePolicy, attach_adapter, load_model

    model_cfg, lora = plan.config["model"], plan.config["lora"]
    model, tokenizer = load_model(
        model_cfg["path"], dtype=model_cfg["dtype"], trust_remote_code=model_cfg["trust_remote_code"]
    )
    peft_model = attach_adapter(
        model,
        rank=lora["rank"],
        alpha=lora["alpha"],
        dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        source=plan.source,
    )
    return EnginePolicy(
        peft_model,
        tokenizer,
        seed=plan.config["seed"],
        scratch_dir=scratch_dir,
        eval_batch_size=model_cfg["eval_batch_size"],
    )


def execute(
    plan: Plan, reporter: Reporter | None = None, policy: Any = None, hooks: Any = None
) -> dict[str, Any]:
    """Run ``plan``; with no ``policy``, load the configured model and attach the adapter.

    ``hooks`` is the plugin manager whose lifecycle hooks watch the run.

    Everything that can fail on bad input (output directory, model, target modules) is checked
    before the run directory is created, so a failed start leaves nothing behind.
    """
    rundir = RunDir(output_dir(plan))
    rundir.check_writable()
    if policy is None:
        from transformers import set_seed

        quiet_libraries()
        set_seed(plan.config["seed"])
        policy = load_policy(plan, rundir.scratch_dir)
    recorded = dict(plan.config)
    recorded["output"] = str(rundir.path)
    rundir.create(dump_config(recorded))
    engine = Engine(plan, policy, rundir, reporter, environment=library_versions(), hooks=hooks)
    try:
        return engine.run()
    finally:
        shutil.rmtree(rundir.scratch_dir, ignore_errors=True)
