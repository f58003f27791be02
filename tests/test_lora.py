"""LoRA: the adapted forward against an independent merge, frozen weights that stay frozen, a sampler that reads
the adapters, bit-exact resumes, and a merged export; the whole relevance pipeline with adapters."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from configs import common, relevance
from graphgrpo_jax import artifacts, config_validation, main, mesh as mesh_lib, sampling
from graphgrpo_jax.graph import credit, spec as spec_lib
from graphgrpo_jax.models import decoder, hf, lora
from graphgrpo_jax.rl import grpo
from graphgrpo_jax.train import export, loop, rl, sft, state as state_lib

RANK = 4
MODEL = decoder.DecoderConfig.from_config(common.model_config("tiny", vocab_size=64, num_layers=2, lora_rank=RANK,
                                                              lora_alpha=8.0))


def _adapted_params(seed: int = 0, b_scale: float = 0.3) -> dict:
    """Tiny params whose adapters are all non-zero (fresh ones have B = 0, the base model itself)."""
    params = decoder.init_params(MODEL, jax.random.key(seed))
    adapters, base = lora.split(params)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    adapters = jax.tree_util.tree_map(lambda x: b_scale * jax.random.normal(next(keys), x.shape), adapters)
    return lora.join(base, adapters)


def _numpy_merged(params: dict, scale: float) -> dict:
    """W + scale · A B for every adapted kernel, written out per projection with explicit axes."""
    out = jax.tree_util.tree_map(np.asarray, lora.without_adapters(params))
    specs = {"q_proj": "lir,lrhd->lihd", "k_proj": "lir,lrhd->lihd", "v_proj": "lir,lrhd->lihd",
             "o_proj": "lhdr,lro->lhdo", "gate_proj": "lir,lro->lio", "up_proj": "lir,lro->lio",
             "down_proj": "lir,lro->lio"}
    for block in ("self_attn", "mlp"):
        for name, projection in params["layers"][block].items():
            if name in specs:
                a, b = np.asarray(projection["lora_a"], np.float64), np.asarray(projection["lora_b"], np.float64)
                out["layers"][block][name]["kernel"] = (np.asarray(projection["kernel"], np.float64)
                                                        + scale * np.einsum(specs[name], a, b)).astype(np.float32)
    return out


def _tokens(rows: int = 3, length: int = 9, seed: int = 2):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, MODEL.vocab_size, (rows, length)).astype(np.int32)
    mask = np.arange(length)[None] >= rng.integers(0, 3, (rows, 1))  # left padding
    return tokens, mask


def test_the_adapted_forward_is_the_forward_of_the_merged_weights():
    params = _adapted_params()
    tokens, mask = _tokens()
    adapted = np.asarray(decoder.forward(params, MODEL, tokens, mask))
    reference = np.asarray(decoder.forward(_numpy_merged(params, MODEL.lora_scale), MODEL.without_lora(), tokens,
                                           mask))
    base = np.asarray(decoder.forward(lora.without_adapters(params), MODEL.without_lora(), tokens, mask))
    assert np.abs(adapted - base).max() > 0.1  # the adapters change the function
    np.testing.assert_allclose(adapted, reference, atol=2e-5)
    merged = lora.merged(params, MODEL.lora_scale)
    assert not lora.has_adapters(merged)
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, atol=1e-6), merged,
                           _numpy_merged(params, MODEL.lora_scale))
    # Prefill through the KV cache (which merges once, `decoding_params`), stacked and unrolled alike.
    for config in (MODEL, dataclasses.replace(MODEL, scan_unroll=MODEL.num_layers)):
        logits, _ = decoder.extend_cache(params, config, decoder.init_cache(config, 3, 9), tokens, mask)
        np.testing.assert_allclose(np.asarray(logits), adapted[:, -1], atol=2e-5)


def test_fresh_adapters_leave_the_base_model_as_it_was():
    base = decoder.init_params(MODEL.without_lora(), jax.random.key(0))
    params = decoder.with_adapters(base, MODEL, jax.random.key(5))
    trainable, frozen = lora.split(params)
    assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(base)
    assert all(np.all(np.asarray(b) == 0) for path, b in flatten_dict(trainable).items() if path[-1] == "lora_b")
    tokens, mask = _tokens()
    np.testing.assert_array_equal(np.asarray(decoder.forward(params, MODEL, tokens, mask)),
                                  np.asarray(decoder.forward(base, MODEL.without_lora(), tokens, mask)))
    assert decoder.with_adapters(params, MODEL, jax.random.key(6)) is params  # already adapted: kept
    trainable_count, total = lora.count(params)
    # 2 layers x (q, k, v: 64·4 + 4·(4|2)·16; o: 64·4 + 4·64; gate, up: 64·4 + 4·128; down: 128·4 + 4·64)
    assert trainable_count == 2 * ((256 + 256) + 2 * (256 + 128) + (256 + 256) + 2 * (256 + 512) + (512 + 256))
    assert total == trainable_count + sum(x.size for x in jax.tree_util.tree_leaves(base))


def test_targets_choose_the_adapted_projections_and_bad_ones_are_named():
    config = dataclasses.replace(MODEL, lora_targets=("q_proj", "v_proj"))
    adapted = {path[-2] for path in flatten_dict(decoder.init_params(config, jax.random.key(0))) if path[-1] == "lora_a"}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match=r"model.lora_targets=\('qproj',\): name one or more of"):
        dataclasses.replace(MODEL, lora_targets=("qproj",))
    axes = decoder.param_logical_axes(MODEL)["layers"]["self_attn"]["o_proj"]
    assert tuple(axes["lora_a"]) == ("layers", "heads", "head_dim", "lora_rank")
    assert tuple(axes["lora_b"]) == ("layers", "lora_rank", "embed")


def _sft_batch(rows: int = 4, length: int = 12, seed: int = 7) -> dict:
    tokens, mask = _tokens(rows, length, seed=seed)
    loss_mask = mask & (np.arange(length)[None] >= length // 2)
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask,
            "node_ids": np.full((rows, length), -1, np.int32)}


def _sft_step(optimizer):
    return jax.jit(sft.make_train_step(MODEL, optimizer, label_node=0, num_nodes=1, p_mask=0.0, mask_unit="token"))


def test_an_sft_step_moves_the_adapters_only_by_their_own_gradient():
    params, batch = _adapted_params(), _sft_batch()
    optimizer = optax.sgd(1.0)  # the update is minus the gradient itself
    state = state_lib.create_state(params, optimizer, jax.random.key(1))
    new_state, _ = _sft_step(optimizer)(state, batch)
    adapters, frozen = lora.split(params)
    new_adapters, new_frozen = lora.split(new_state["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_frozen, frozen)  # bit for bit
    # The reference gradient: the same loss of the merged weights W + s·A·B, differentiated in A and B.
    weights = (batch["loss_mask"]).astype(np.float32)

    def merged_loss(adapters):
        merged = lora.merged(lora.join(frozen, adapters), MODEL.lora_scale)
        logp = decoder.token_log_probs(merged, MODEL.without_lora(), batch["tokens"], batch["attention_mask"])
        return -(logp * weights).sum() / weights.sum()

    reference = jax.grad(merged_loss)(adapters)
    moved = jax.tree_util.tree_map(lambda before, after: before - after, adapters, new_adapters)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(reference)) > 1e-3
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=2e-3, atol=1e-6), moved, reference)


def test_frozen_weights_have_no_optimizer_state():
    params = _adapted_params()
    opt_state = state_lib.new_state(params, optax.adam(1e-3), jax.random.key(0))["opt_state"]
    adapters, _ = lora.split(params)
    moments = opt_state[0]
    assert jax.tree_util.tree_structure(moments.mu) == jax.tree_util.tree_structure(adapters)
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(opt_state))
    assert state_size == 2 * lora.count(params)[0] + 1  # Adam's two moments of the adapters, and its count


def test_the_sampler_samples_the_adapted_model():
    """Greedy tokens of the adapted params are those of the merged model and not those of the base model
    (TRL and Unsloth runs have shipped sampling the base model)."""
    params = _adapted_params(b_scale=1.0)
    prompts, _ = _tokens(4, 6, seed=11)
    mask = np.ones_like(prompts, bool)
    greedy = sampling.SamplingParams(temperature=0.0)

    def generate(params, config):
        return np.asarray(sampling.generate(params, config, prompts, mask, jax.random.key(0), max_new_tokens=8,
                                            eos_ids=1, pad_id=0, sampling=greedy).tokens)

    adapted = generate(params, MODEL)
    np.testing.assert_array_equal(adapted, generate(_numpy_merged(params, MODEL.lora_scale), MODEL.without_lora()))
    assert (adapted != generate(lora.without_adapters(params), MODEL.without_lora())).any()
    # The RL stage's sharded sampler on a mesh, from the same params.
    layout = mesh_lib.Layout.from_config(None)
    shardings = layout.param_shardings(params, decoder.param_logical_axes(MODEL))
    sharded = mesh_lib.shard_sampler(layout.mesh, shardings, MODEL, max_new_tokens=8)
    out = sharded(params, prompts, mask, jax.random.key(0), greedy, jnp.asarray([1]), jnp.asarray(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), adapted)


def test_a_lora_run_resumes_bit_for_bit(tmp_path):
    optimizer = optax.adam(1e-2)
    step = _sft_step(optimizer)
    start = state_lib.create_state(_adapted_params(), optimizer, jax.random.PRNGKey(1))
    batches = [_sft_batch(seed=i) for i in range(4)]
    run = functools.partial(loop.fit, step_fn=step, num_steps=4, stage="sft", save_every=2, async_save=False)
    straight = run(start, batch_fn=batches.__getitem__, workdir=str(tmp_path / "straight"))

    def dies_at_step_4(i):
        if i == 3:
            raise KeyboardInterrupt("killed")
        return batches[i]

    with pytest.raises(KeyboardInterrupt):
        run(start, batch_fn=dies_at_step_4, workdir=str(tmp_path / "resumed"))
    resumed = run(start, batch_fn=batches.__getitem__, workdir=str(tmp_path / "resumed"))
    leaves = jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)
    assert len(leaves[0]) == len(leaves[1]) > 20
    for a, b in zip(*leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_rl_update_trains_adapters_against_the_base_as_reference():
    params = decoder.with_adapters(decoder.init_params(MODEL.without_lora(), jax.random.key(0)), MODEL,
                                   jax.random.key(1))
    spec = spec_lib.graph_spec(spec_lib.default_graph_config())
    group, prompts, prompt_len, completion_len = 4, 2, 5, 2 * spec.num_nodes
    rng = np.random.default_rng(0)
    rows, width = group * prompts, prompt_len + completion_len
    tokens = rng.integers(2, 64, (rows, width)).astype(np.int32)
    tokens[:, :prompt_len] = np.repeat(rng.integers(2, 64, (prompts, prompt_len)), group, axis=0)
    completion = np.zeros((rows, width), bool)
    completion[:, prompt_len:] = True
    node_ids = np.full((rows, width), -2, np.int32)
    node_ids[:, prompt_len:] = np.repeat(np.arange(spec.num_nodes), 2)
    batch = {"tokens": tokens, "attention_mask": np.ones((rows, width), bool), "completion_mask": completion,
             "node_ids": node_ids, "truncated": np.zeros(rows, bool)}
    rewards = np.array([1, 0, 0, 1, 0, 1, 1, 1], np.float32)
    graph = spec_lib.encode_rollouts(spec, rewards, rng.integers(0, 2, (rows, spec.num_nodes)).astype(np.int32),
                                     None, group, max_rollouts=rows + 1)
    settings = credit.credit_settings(credit.default_credit_config(), spec)
    cfg = grpo.default_grpo_config()
    cfg.update(num_generations=group, num_iterations=2, max_completion_length=completion_len, beta=0.1)
    optimizer = state_lib.make_optimizer(ml_collections.ConfigDict(dict(learning_rate=1e-2)), 10)
    update = rl.make_update(MODEL, cfg, spec, settings, optimizer, "main_loss", prompt_len=prompt_len,
                            share_prompts=True)
    adapters, frozen = lora.split(params)
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
    new_params, opt_state, _, metrics = update(copy(params), optimizer.init(copy(adapters)),
                                               jnp.full((spec.num_edges,), 0.5), batch, graph, copy(adapters))
    new_adapters, new_frozen = lora.split(new_params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_frozen, frozen)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(new_adapters),
                                                            jax.tree_util.tree_leaves(adapters))) > 1e-4
    assert abs(float(metrics["kl"])) < 1e-6  # the first iteration's policy is the reference (B = 0: the base)
    assert jax.tree_util.tree_structure(opt_state[1][0].mu) == jax.tree_util.tree_structure(adapters)


def test_hugging_face_folders_hold_the_plain_model(tmp_path):
    params = _adapted_params()
    with pytest.raises(ValueError, match="merge them first"):
        hf.save_hf(params, MODEL, tmp_path)
    merged = lora.merged(params, MODEL.lora_scale)
    hf.save_hf(merged, MODEL, tmp_path)  # a LoRA run's model config: the folder describes the plain model
    assert hf.config_from_hf(tmp_path).get("lora_rank") is None
    jax.tree_util.tree_map(np.testing.assert_array_equal, hf.load_params(tmp_path, MODEL), merged)


def test_lora_dropout_is_refused_for_grpo_and_runs_in_sft():
    config = relevance.get_config("micro")
    config.model.update(lora_rank=4, lora_dropout=0.1)
    with pytest.raises(config_validation.ConfigError, match="config.model.lora_dropout = 0.1 with the 'rl' stage"):
        config_validation.validate(config, stages=main.STAGES, check_files=False)
    config.stages = ("data", "sft")
    config_validation.validate(config, stages=main.STAGES, check_files=False)
    params, batch = _adapted_params(), _sft_batch()
    with_dropout = dataclasses.replace(MODEL, lora_dropout=0.5)
    a, b = (decoder.token_log_probs(params, with_dropout, batch["tokens"], batch["attention_mask"],
                                    dropout_rng=jax.random.key(i)) for i in (0, 1))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(decoder.token_log_probs(params, with_dropout, batch["tokens"],
                                                                     batch["attention_mask"])),
                                  np.asarray(decoder.token_log_probs(params, MODEL, batch["tokens"],
                                                                     batch["attention_mask"])))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The micro relevance pipeline with rank-4 adapters, GRPO with a KL term, and the export of both policies."""
    workdir = tmp_path_factory.mktemp("lora")
    config = relevance.get_config("micro")
    config.model.update(lora_rank=RANK, lora_alpha=8.0)
    config.stages = ("data", "sft", "rl", "export")
    config.grpo.beta = 0.05
    config.export.policies = ("sft", "rl")
    main.run(config, str(workdir))
    return config, str(workdir)


def test_the_pipeline_trains_adapters_on_a_frozen_base_and_exports_them_merged(lora_run):
    config, workdir = lora_run
    model_config = decoder.DecoderConfig.from_config(config.model)
    sft_params, rl_params = (jax.device_get(artifacts.policy_params(config, workdir, stage)) for stage in ("sft", "rl"))
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # sft.init_state's
    _, initial_base = lora.split(decoder.init_params(model_config, init_rng))  # eager: rounding differs from jit's
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                           lora.split(sft_params)[1], initial_base)
    jax.tree_util.tree_map(np.testing.assert_array_equal, lora.split(rl_params)[1], lora.split(sft_params)[1])
    # (Whether GRPO moves the adapters is tested on a batch with reward spread, above: the micro policy's rollouts
    # all score alike, so its two RL steps have no advantage to follow.)
    assert jax.tree_util.tree_structure(lora.split(rl_params)[0]) == jax.tree_util.tree_structure(
        lora.split(sft_params)[0])
    trained_b = [leaf for path, leaf in flatten_dict(sft_params).items() if path[-1] == "lora_b"]
    assert all(np.abs(leaf).max() > 0 for leaf in trained_b)  # SFT moved every B from its zero start
    tokens, mask = _tokens(2, 10, seed=4)
    for policy, params in (("sft", sft_params), ("rl", rl_params)):
        folder = export.export_dir(workdir, policy)
        loaded_config = hf.config_from_hf(folder)
        exported = hf.load_params(folder, loaded_config)
        jax.tree_util.tree_map(np.testing.assert_array_equal, exported, lora.merged(params, model_config.lora_scale))
        plain = decoder.DecoderConfig.from_config(loaded_config)
        assert plain.lora_rank == 0
        np.testing.assert_allclose(np.asarray(decoder.forward(exported, plain, tokens, mask)),
                                   np.asarray(decoder.forward(params, model_config, tokens, mask)), atol=2e-5)



def test_a_policy_trained_without_adapters_gets_fresh_ones_and_the_reverse_is_refused(lora_run, tmp_path):
    """Full SFT then LoRA GRPO reads the full checkpoint and adds B = 0 adapters; a LoRA checkpoint read under a
    config without LoRA would lose its adapters, so it fails, naming the setting."""
    config, workdir = lora_run
    plain = relevance.get_config("micro")
    with pytest.raises(ValueError, match=r"holds LoRA adapters, but config.model.lora_rank = 0"):
        artifacts.policy_params(plain, workdir, "sft")
    full_workdir = tmp_path / "full"
    plain.stages, plain.sft.num_steps = ("data", "sft"), 2
    main.run(plain, str(full_workdir))
    full = jax.device_get(artifacts.policy_params(plain, str(full_workdir), "sft"))
    adapted = jax.device_get(artifacts.policy_params(config, str(full_workdir), "sft"))
    adapters, base = lora.split(adapted)
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, full)
    assert lora.has_adapters(adapted) and all(
        np.all(leaf == 0) for path, leaf in flatten_dict(adapters).items() if path[-1] == "lora_b")
