r"""Offline A/B tests of the search stack (issue #11) on finished rewrite and relevance runs.

  python experiments/ab_test.py --config=configs/ab_test.py --workdir=runs/ab_test \
    --rewrite_workdir=runs/rewrite_cpu --relevance_workdir=runs/relevance_cpu

The world, catalogue and search index are the rewrite run's (its `data` and `index` stages); its `sft`
and `rl` checkpoints are the `sft` / `rl` rewriters. The relevance run's distilled student
(`config.student.run_name`) is exported for serving into `<workdir>/serving/<run_name>` once (re-exported
when its checkpoint changes) and the A/B runner scores with that artifact, as a search service would;
its policy (`relevance="policy"`) scores by forced decoding of the label. Results: `<workdir>/report.md`,
`results.json` and `plots/`.
"""

import functools
import json
import os
import pathlib

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from configs import defaults
from graphgrpo_jax.data import cot, prepare
from graphgrpo_jax.eval import rewrite as rewrite_eval
from graphgrpo_jax.models import decoder, encoder
from graphgrpo_jax.search import ab, pipeline, serving
from graphgrpo_jax.search.engine import SearchEngine
from graphgrpo_jax import artifacts, checkpointing
from graphgrpo_jax.train import distill

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ab_test.py", "A/B config (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: serving artifact, report, plots.")
_REWRITE_WORKDIR = flags.DEFINE_string("rewrite_workdir", None, "A finished rewrite run (index, sft, rl).")
_RELEVANCE_WORKDIR = flags.DEFINE_string("relevance_workdir", None,
                                         "A finished relevance run with a distill stage (for student/policy arms).")


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run wrote to its workdir (importing graphgrpo_jax.main would define its flags)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a finished run's workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def rewriters(config: ml_collections.ConfigDict, rewrite_config: ml_collections.ConfigDict, world,
              workdir: str, names: set[str]) -> dict[str, pipeline.Rewriter]:
    """The rewriters the arms name: raw, gold (the world's gold rewrite: a ceiling) and the run's policies."""
    gold = {query.text: query.gold_rewrite for query in world.queries}
    available: dict[str, pipeline.Rewriter] = {"raw": pipeline.raw_query,
                                               "gold": lambda texts: [gold[text] for text in texts]}
    for stage in names & {"sft", "rl"}:
        available[stage] = functools.partial(
            rewrite_eval.generate_rewrites, artifacts.policy_params(rewrite_config, workdir, stage),
            decoder.DecoderConfig.from_config(rewrite_config.model), artifacts.load_tokenizer(rewrite_config, workdir),
            max_prompt_len=rewrite_config.data.max_prompt_len, max_new_tokens=rewrite_config.data.max_response_len,
            batch_size=config.rewrite_batch_size)
    return available


def student_heads(relevance_workdir: str, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The heads student `cfg.run_name` was trained with (its `report.json`), else `cfg.heads`."""
    report = pathlib.Path(relevance_workdir) / cfg.run_name / "report.json"
    return tuple(json.loads(report.read_text())["heads"]) if report.is_file() else tuple(cfg.heads)


def student_config(relevance_config: ml_collections.ConfigDict, relevance_workdir: str,
                   cfg: ml_collections.ConfigDict):
    """The relevance run's `distill` section (defaults where the run predates it) for student `cfg.run_name`."""
    distill_cfg = relevance_config.get("distill") or defaults.distill()
    distill_cfg = ml_collections.ConfigDict(distill_cfg.to_dict())
    distill_cfg.update(run_name=cfg.run_name, heads=student_heads(relevance_workdir, cfg))
    relevance_config = ml_collections.ConfigDict(relevance_config.to_dict())
    relevance_config.distill = distill_cfg
    return relevance_config


def exported_student(config: ml_collections.ConfigDict, relevance_config: ml_collections.ConfigDict,
                     relevance_workdir: str, workdir: str) -> pathlib.Path:
    """`<workdir>/serving/<run_name>`, exported from the run's newest student checkpoint unless already there."""
    cfg = config.student
    relevance_config = student_config(relevance_config, relevance_workdir, cfg)
    with checkpointing.Checkpointer(artifacts.checkpoint_dir(relevance_workdir, cfg.run_name)) as ckpt:
        steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no student checkpoint '{cfg.run_name}' in {relevance_workdir}: run its distill stage")
    source = {"workdir": os.path.abspath(relevance_workdir), "run_name": cfg.run_name, "step": max(steps)}
    directory = pathlib.Path(workdir) / "serving" / cfg.run_name
    if (directory / serving.META_FILE).is_file() and serving.read_meta(directory)["source"] == source:
        return directory
    encoder_config = artifacts.student_config()
    params = artifacts.student_params(relevance_config, relevance_workdir)
    max_length = relevance_config.distill.max_length
    logging.info("exporting student %s (step %d) to %s", cfg.run_name, max(steps), directory)
    return serving.export_cross_encoder(
        directory, lambda p, *inputs: encoder.node_logits(p, encoder_config, *inputs), params,
        encoder.load_pair_tokenizer(encoder.minilm_folder()),
        {node: artifacts.STUDENT_NODE_VALUES[node] for node in relevance_config.distill.heads}, max_length,
        platforms=tuple(cfg.platforms), source=source, overwrite=True)


def scorers(config: ml_collections.ConfigDict, relevance_workdir: str | None, workdir: str,
            names: set[str]) -> dict[str, pipeline.RelevanceScorer]:
    """The relevance scorers the arms name: the exported student, and the relevance policy."""
    names = names - {"none"}
    if not names:
        return {}
    unknown = sorted(names - {"student", "policy"})
    if unknown:
        raise ValueError(f"config.arms name relevance models {unknown}; available: student, policy, none")
    if not relevance_workdir:
        raise ValueError(f"arms use relevance models {sorted(names)}: pass --relevance_workdir")
    relevance_config = run_config(relevance_workdir)
    available: dict[str, pipeline.RelevanceScorer] = {}
    if "student" in names:
        served = serving.ServedCrossEncoder(exported_student(config, relevance_config, relevance_workdir, workdir),
                                            batch_size=config.student.batch_size)
        if served.heads.get(cot.LABEL_NODE) != list(cot.LABELS):
            raise ValueError(f"the exported student's {cot.LABEL_NODE!r} head has labels "
                             f"{served.heads.get(cot.LABEL_NODE)}, expected {list(cot.LABELS)}")
        available["student"] = lambda queries, titles: served.score(queries, titles)[cot.LABEL_NODE]
    if "policy" in names:
        policy_config = student_config(relevance_config, relevance_workdir, config.student)
        policy_config.distill.teacher = "forced"
        params = artifacts.policy_params(policy_config, relevance_workdir, policy_config.distill.policy)
        tokenizer = artifacts.load_tokenizer(policy_config, relevance_workdir)
        available["policy"] = lambda queries, titles: distill.policy_teacher(
            params, policy_config, tokenizer, queries, titles)[cot.LABEL_NODE]
    return available


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    rewrite_config = run_config(_REWRITE_WORKDIR.value)
    world = prepare.load_world(rewrite_config)
    engine = SearchEngine.open(artifacts.index_dir(_REWRITE_WORKDIR.value))
    arms = {name: pipeline.ArmSpec.from_mapping(name, values) for name, values in config.arms.items()}
    used = {name for text in config.comparisons for name in ab.parse_comparison(text, arms)}
    logging.info("JAX %s on %s; arms %s", jax.__version__, jax.devices(), sorted(used))
    results = ab.run_ab(
        config, world=world, engine=engine,
        rewriters=rewriters(config, rewrite_config, world, _REWRITE_WORKDIR.value, {arms[a].rewriter for a in used}),
        scorers=scorers(config, _RELEVANCE_WORKDIR.value, _WORKDIR.value, {arms[a].relevance for a in used}),
        workdir=_WORKDIR.value)
    print((pathlib.Path(_WORKDIR.value) / "report.md").read_text())
    logging.info("arms: %s", {name: arm["milliseconds_per_query"]["total"] for name, arm in results["arms"].items()})


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "rewrite_workdir"])
    app.run(main)
