"""`rl` stage: Graph-GRPO (or any registered credit variant) from the SFT policy.

Each step: draw prompts (a deterministic function of the step) → sample G completions each with the jitted
KV-cache sampler → parse and score them on the host (the task `config.task` names, `tasks/`, through
`rl/rollout.py`) → encode the groups as a jraph batch → μ = `grpo.num_iterations` jitted updates of the
clipped policy loss, whose token advantages come from `graph/credit.py` inside the differentiated function, so
the same gradient call also yields dLoss/dφ for the `main_loss` controller. φ and the controller's optimizer
live in the training state and are checkpointed with the policy.

Everything lives on the mesh of `config.mesh` (`mesh.py`): the policy is restored straight into its
shardings, the sampler and the update run sharded, and each process loads only its rows of the prompts and
of the update's batch; the host-side scoring sees every rollout (group statistics need whole groups).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from graphgrpo_jax import artifacts, mesh as mesh_lib, sampling, tasks
from graphgrpo_jax.eval import credit as eval_credit
from graphgrpo_jax.graph import controller as controller_lib, credit as credit_lib, spec as spec_lib
from graphgrpo_jax.models import decoder, lora
from graphgrpo_jax.rl import grpo, rollout
from graphgrpo_jax.train import loop, state as state_lib


@functools.lru_cache(maxsize=8)
def _cached_update(model_config: decoder.DecoderConfig, grpo_settings: grpo.GrpoSettings, spec: spec_lib.GraphSpec,
                   settings: credit_lib.CreditSettings, optim_settings: state_lib.OptimizerSettings, num_steps: int,
                   controller_mode: str, prompt_len: int | None, share_prompts: bool, microbatches: int):
    """`make_update` cached on its frozen settings, so that repeated runs in one process (ablations, tests) jit
    the same function, which JAX compiles once per layout."""
    return make_update(model_config, grpo_settings, spec, settings, state_lib.make_optimizer(optim_settings, num_steps),
                       controller_mode, prompt_len=prompt_len, share_prompts=share_prompts, microbatches=microbatches)


def make_update(model_config, grpo_cfg, spec, settings, optimizer, controller_mode: str = "fixed", *,
                prompt_len: int | None = None, share_prompts: bool = False, microbatches: int = 1):
    """Jitted μ-iteration update: returns new params/opt state, the φ-gradient for the controller and metrics.

    `grpo_cfg`: the GRPO options, `grpo.GrpoSettings` or a `config.grpo` section (validated by
    `grpo.grpo_settings`). Its `scale_rewards` is applied by the credit computation, so the credit
    `settings` must have been built with the same one (`credit_settings(..., scale_rewards=)`).

    `prompt_len`: the width of the batch's prompt block (every row's completion starts there), so that
    log-probs are computed for completion tokens only (`decoder.token_log_probs_and_entropy`'s
    `targets_from`); None scores every position.

    `share_prompts`: each group of `num_generations` consecutive rows has one prompt block (the rollout
    layout), so the forward and backward passes run it once per group instead of once per row
    (`decoder.token_log_probs_and_entropy`'s `group_size`; needs `prompt_len`). Same update, less work:
    with prompts as long as completions and G = 8, 44% fewer tokens.

    `microbatches`: the forward and backward passes run over that many slices of whole groups in turn
    and their sums are added (`state.summed_value_and_grad`): the same update, a smaller working set
    (less memory; faster on CPU). The loss's batch-wide normalisers come from the whole batch
    (`grpo.loss_weights`), and the φ-gradient is pulled back through the whole batch's credit. The
    `alignment` controller's cross-fitted gradient is computed unsliced.

    The φ-gradient is what the controller descends: for `main_loss`, dLoss/dφ averaged over the μ
    iterations; for `alignment`, minus the gradient of the cross-fitted cosine between the graph-credit
    and the outcome-GRPO policy gradients (graph/controller.py), taken at the pre-update policy.
    """
    grpo_cfg = grpo.grpo_settings(grpo_cfg)
    if settings.scale_rewards != grpo_cfg.scale_rewards:
        raise ValueError(f"GRPO config field 'scale_rewards' = {grpo_cfg.scale_rewards!r}, but the credit settings "
                         f"were built with {settings.scale_rewards!r}, which the advantages would follow")
    outcome_settings = dataclasses.replace(settings, variant="outcome")
    if share_prompts and prompt_len is None:
        raise ValueError("make_update(share_prompts=True) needs the prompt block's width, prompt_len")
    targets_from = 1 if prompt_len is None else prompt_len
    group_size = grpo_cfg.num_generations if share_prompts else 1

    def completion_width(batch) -> int:
        """The most completion tokens a row holds: the rows' width less the prompt block (dr_grpo's bound)."""
        return batch["tokens"].shape[1] - (prompt_len or 0)

    def log_probs(params, tokens, attention_mask):
        """(log-probs, entropies) `[N, L]` of the completion tokens, 0 on the prompt block."""
        return decoder.token_log_probs_and_entropy(params, model_config, tokens, attention_mask,
                                                   targets_from=targets_from, group_size=group_size)

    def surrogate(params, phi, batch, graph, rows: slice, credit_settings):
        """The μ = 1 policy loss over `rows` (whole groups); its params-gradient is the policy gradient."""
        credit = credit_lib.compute_credit(graph, phi, batch["node_ids"], batch["completion_mask"],
                                           spec=spec, settings=credit_settings)
        logp, _ = log_probs(params, batch["tokens"][rows], batch["attention_mask"][rows])
        loss, _ = grpo.policy_loss(logp, None, credit.token_advantages[rows], batch["completion_mask"][rows],
                                   grpo_cfg, truncated=batch["truncated"][rows],
                                   completion_width=completion_width(batch))
        return loss

    def alignment_grad(params, phi, batch, graph):
        rows = batch["tokens"].shape[0]
        cut = rows // grpo_cfg.num_generations // 2 * grpo_cfg.num_generations
        halves = (slice(0, cut), slice(cut, rows))
        trainable, frozen = lora.split(params)  # policy gradients in the space that training moves
        pg = lambda p, h, credit_settings: jax.grad(
            lambda t: surrogate(lora.join(frozen, t), p, batch, graph, h, credit_settings))(trainable)
        graph_pg = lambda p, h: pg(p, h, settings)
        outcome_pg = lambda h: pg(phi, h, outcome_settings)
        return jax.grad(lambda p: -controller_lib.alignment_objective(p, graph_pg, outcome_pg, halves))(phi)

    def slice_loss(frozen, trainable_and_advantages, rows: dict):
        """The policy loss's (additive) share of `rows`, and its logs' shares."""
        trainable, advantages = trainable_and_advantages
        logp, entropy = log_probs(lora.join(frozen, trainable), rows["tokens"], rows["attention_mask"])
        return grpo.policy_loss_terms(logp, rows.get("old_logp"), advantages[rows["row"]],
                                      grpo.LossWeights(rows["loss_weight"], rows["mean_weight"]), grpo_cfg,
                                      rows.get("ref_logp"), entropy=jax.lax.stop_gradient(entropy))

    def loss_and_grads(params, phi, batch, graph, old_logp, ref_logp):
        """(loss, logs) and the gradients of the trainable params (`lora.split`) and of φ, over `microbatches`
        slices of the batch's rows."""
        def advantages_of(phi):
            credit = credit_lib.compute_credit(graph, phi, batch["node_ids"], batch["completion_mask"],
                                               spec=spec, settings=settings)
            return credit.token_advantages, credit.node_stats

        advantages, pull_back, node_stats = jax.vjp(advantages_of, phi, has_aux=True)
        weights = grpo.loss_weights(batch["completion_mask"], grpo_cfg, batch["truncated"],
                                    completion_width=completion_width(batch))
        rows = {"tokens": batch["tokens"], "attention_mask": batch["attention_mask"],
                "row": jnp.arange(batch["tokens"].shape[0]), "loss_weight": weights.loss,
                "mean_weight": weights.mean}
        rows.update({name: x for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp)) if x is not None})
        trainable, frozen = lora.split(params)
        (loss, metrics), (g_params, g_advantages) = state_lib.summed_value_and_grad(
            functools.partial(slice_loss, frozen), (trainable, advantages), rows, microbatches, has_aux=True,
            rows_together=group_size)
        metrics = {**metrics, **grpo.completion_metrics(batch["completion_mask"], batch["truncated"]), **node_stats}
        return (loss, metrics), (g_params, pull_back(g_advantages)[0])

    def forward_log_probs(params, batch):
        """Log-probs `[N, L]` of the completion tokens, without a gradient, slice by slice."""
        rows = {"tokens": batch["tokens"], "attention_mask": batch["attention_mask"]}
        return jax.lax.stop_gradient(state_lib.map_rows(
            lambda r: log_probs(params, r["tokens"], r["attention_mask"])[0], rows, microbatches, group_size))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, phi, batch, graph, ref_params):
        # `ref_params`: the reference's trainable part (`lora.split`); with LoRA only its adapters are a copy,
        # and it runs on the policy's own frozen base weights.
        ref_logp = (forward_log_probs(lora.join(lora.split(params)[1], ref_params), batch)
                    if grpo_cfg.beta > 0 else None)
        old_logp = forward_log_probs(params, batch) if grpo_cfg.num_iterations > 1 else None

        def iteration(carry, _):
            params, opt_state = carry
            (_, metrics), (g_params, g_phi) = loss_and_grads(params, phi, batch, graph, old_logp, ref_logp)
            metrics["grad_norm"] = optax.global_norm(g_params)
            return state_lib.apply_gradients(optimizer, params, opt_state, g_params), (g_phi, metrics)

        g_align = alignment_grad(params, phi, batch, graph) if controller_mode == "alignment" else None
        (params, opt_state), (g_phi, metrics) = jax.lax.scan(iteration, (params, opt_state), None,
                                                             length=grpo_cfg.num_iterations)
        g_phi = g_align if controller_mode == "alignment" else g_phi.mean(0)
        return params, opt_state, g_phi, jax.tree_util.tree_map(lambda m: m[0], metrics)

    return update


def blame_metrics(spec, settings, graph, phi, batch: rollout.Rollouts, scored: rollout.Scored) -> dict:
    """Credit diagnostics against gold node values (METHOD.md A2': a diagnostic, not a success metric)."""
    credit = credit_lib.compute_credit(graph, phi, jnp.asarray(batch.node_ids), jnp.asarray(batch.completion_mask),
                                       spec=spec, settings=settings)
    diag = eval_credit.credit_diagnostics(spec, np.asarray(credit.node_credits), scored.node_correct,
                                          scored.rewards == 1.0, scored.node_values >= 0)
    return {"credit/blame_precision_at_1": diag.blame_precision_at_1,
            "credit/blame_precision_tie_expected": diag.blame_precision_tie_expected,
            "credit/blame_random_baseline": diag.blame_random_baseline,
            "credit/credit_correctness_corr": diag.credit_correctness_corr}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    cfg, grpo_cfg = config.rl, config.grpo
    grpo_cfg = grpo.grpo_settings(grpo_cfg)  # validated and frozen: the update is cached on it
    group_size = grpo_cfg.num_generations
    tokenizer = artifacts.load_tokenizer(config, workdir)
    model_config = decoder.DecoderConfig.from_config(config.model)
    spec = spec_lib.graph_spec(config.graph)
    settings = credit_lib.credit_settings(config.credit, spec, config.grpo.scale_rewards)
    ctrl_settings = controller_lib.controller_settings(config.controller, spec,
                                                       num_iterations=grpo_cfg.num_iterations)
    if ctrl_settings.mode == "alignment" and cfg.prompts_per_step < 2:
        raise ValueError("config.controller.mode = 'alignment' cross-fits over two halves of the prompts: "
                         f"config.rl.prompts_per_step = {cfg.prompts_per_step} must be >= 2")

    # Mesh → policy state in its shardings (restored straight into them) → sharded update and sampler.
    layout = mesh_lib.Layout.from_config(config.get("mesh"))
    sft_params = artifacts.policy_params(config, workdir, layout=layout)
    optim_settings = state_lib.optimizer_settings(config.rl_optim, "rl_optim")
    optimizer = state_lib.make_optimizer(optim_settings, cfg.num_steps)
    # The reference is the SFT policy's trainable part, copied (the policy's buffers are donated to each update);
    # with LoRA that is the adapters only, the base weights being shared with the policy (`make_update`).
    ref_params = jax.tree_util.tree_map(jnp.copy, lora.split(sft_params)[0]) if grpo_cfg.beta > 0 else None

    def init_state(params) -> dict:
        state = state_lib.new_state(params, optimizer, jax.random.PRNGKey(config.seed + 1))
        return {**state, "controller": controller_lib.init_controller(spec, ctrl_settings)}

    state, shardings = layout.init(init_state, decoder.param_logical_axes(model_config), sft_params)
    # Cached on the (hashable) settings, so repeated runs in one process (ablations, tests) compile once.
    update = mesh_lib.shard_rl_update(
        _cached_update(model_config, grpo_cfg, spec, settings, optim_settings, cfg.num_steps, ctrl_settings.mode,
                       config.data.max_prompt_len, True,  # every prompt is padded to this width, G rows each
                       config.rl_optim.get("microbatches", 1)),
        layout.mesh, shardings["params"], shardings["opt_state"], reference=grpo_cfg.beta > 0,
        batch_shardings=layout.batch_sharding)
    generate = mesh_lib.shard_sampler(layout.mesh, shardings["params"], model_config,
                                      max_new_tokens=config.data.max_response_len, rules=layout.rule_map,
                                      group_size=group_size)
    task = tasks.task_of(config).rl_task(config, workdir, spec)
    pieces = rollout.TokenPieces(tokenizer)
    sample_cfg = sampling.SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)

    encoded = task.encode_prompts(tokenizer, config.data.max_prompt_len)

    def batch_fn(step: int) -> np.ndarray:
        return np.random.default_rng([config.seed, 2, step]).choice(len(encoded["tokens"]), cfg.prompts_per_step,
                                                                     replace=False)

    def step_fn(state, rows):
        started = time.perf_counter()
        rows = np.repeat(rows, group_size)
        prompt_tokens = encoded["tokens"][rows]
        prompt_mask = encoded["attention_mask"][rows].astype(bool)
        rng, sample_rng = jax.random.split(state["rng"])
        # Each process feeds the sampler its own prompt rows; every process then scores every rollout
        # (group statistics need whole groups) and loads its own rows of the update's batch.
        global_prompts = layout.load_batch(np.arange(len(rows)), lambda mine: (prompt_tokens[mine],
                                                                               prompt_mask[mine]))
        out = layout.to_host(generate(state["params"], *global_prompts, sample_rng, sample_cfg,
                                      tokenizer.eos_token_id, tokenizer.pad_token_id))
        generated = time.perf_counter()
        batch = rollout.assemble(task, pieces, rows, prompt_tokens, prompt_mask, out.tokens, out.lengths,
                                 out.truncated)
        scored = batch.scored
        graph = spec_lib.encode_rollouts(spec, scored.rewards, scored.node_values, scored.gold_label, group_size,
                                         max_rollouts=len(rows) + 1)
        arrays = batch.arrays()
        update_batch = layout.load_batch(np.arange(len(rows)), lambda mine: {k: v[mine] for k, v in arrays.items()})
        ctrl = state["controller"]
        scored_at = time.perf_counter()
        params, opt_state, g_phi, metrics = jax.block_until_ready(
            update(state["params"], state["opt_state"], ctrl.phi, update_batch, graph, ref_params))
        updated = time.perf_counter()
        if scored.node_correct is not None:
            metrics.update(blame_metrics(spec, settings, graph, ctrl.phi, batch, scored))
        ctrl, ctrl_metrics = controller_lib.controller_update(ctrl, g_phi, ctrl_settings)
        reward_stats = grpo.group_reward_stats(jnp.asarray(scored.rewards), group_size)
        metrics = {**{f"rl/{k}": v for k, v in metrics.items() if not k.startswith("credit/")},
                   **{k: v for k, v in metrics.items() if k.startswith("credit/")},
                   **{f"rl/{k}": v for k, v in reward_stats.items()}, **ctrl_metrics, **scored.metrics,
                   # Where a step's time goes: sampling, host-side scoring and encoding, the jitted update
                   # (old/reference log-probs and the μ iterations), and the rest (diagnostics, controller).
                   "time/generate_s": generated - started, "time/score_s": scored_at - generated,
                   "time/update_s": updated - scored_at, "time/other_s": time.perf_counter() - updated}
        return {**state, "params": params, "opt_state": opt_state, "rng": rng, "controller": ctrl}, metrics

    return loop.fit(state, step_fn, batch_fn, num_steps=cfg.num_steps, workdir=workdir, stage="rl",
                    save_every=config.checkpoint.save_every, max_to_keep=config.checkpoint.max_to_keep,
                    log_every=cfg.log_every, progress_keys=("rl/reward", "rl/accuracy"))
