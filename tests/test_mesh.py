"""Sharded training on the fake 8-device CPU mesh (tests/conftest.py): rules, steps, sampler, checkpoints.

The sharded SFT step and GRPO update must give one device's numbers on meshes (8,1,1), (2,2,2) and
(1,4,2), with every param split as the rules say; checkpoints move between 8 devices and 1.
"""

import functools
import logging

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import multiprocess_worker as worker
from configs import common, relevance_pod
from graphgrpo_jax import checkpointing, config_validation, main, mesh as mesh_lib, sampling
from graphgrpo_jax.models import decoder
from graphgrpo_jax.train import rl, sft

MODEL = worker.MODEL  # vocab 128, hidden 32, 4 heads, 2 kv heads, head_dim 8, mlp 64, 1 layer
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
TOLERANCE = 1e-5
BATCH, LENGTH = 8, 16


def mesh_of(shape) -> jax.sharding.Mesh:
    return mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, shape)))


def _path_name(path) -> str:
    return "/".join(str(key.key) for key in path)


def max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: np.max(np.abs(np.asarray(x) - np.asarray(y))), a, b)
    return float(max(jax.tree_util.tree_leaves(diffs)))


# --------------------------------------------------------------------------------------------------
# Mesh and rules from the config (no compilation)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, devices, expected", [
    (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
    (dict(data=1, fsdp=-1, tensor=2), 8, (1, 4, 2)),
    (dict(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
    (dict(data=4, fsdp=-1, tensor=2), 64, (4, 8, 2)),
    (dict(fsdp=-1), 8, (1, 8, 1)),  # absent axes have size 1
])
def test_mesh_shape_resolves_the_rest(sizes, devices, expected):
    assert mesh_lib.mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize("sizes, message", [
    (dict(data=-1, fsdp=-1, tensor=1), "at most one axis may be -1"),
    (dict(data=2, fsdp=2, tensor=1), "need 4 devices, but 8 are available"),
    (dict(data=3, fsdp=-1, tensor=1), "do not split into the fixed axes' 3"),
    (dict(data=0, fsdp=-1, tensor=1), r"config.mesh.data = 0"),
    (dict(data=1, fsdp=-1, tensor=2.0), r"config.mesh.tensor = 2.0"),
])
def test_bad_mesh_sizes_name_the_problem(sizes, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.mesh_shape(sizes, 8)


def test_make_mesh_uses_every_device_with_auto_axes():
    mesh = mesh_lib.make_mesh(common.mesh_config("fsdp_tensor"))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_rules_come_from_the_config():
    mesh_cfg = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1,
                                              rules=dict(embed=None, mlp=("fsdp", "tensor"), experts="data")))
    rules = mesh_lib.logical_rules(mesh_cfg)
    assert rules["embed"] == () and rules["mlp"] == ("fsdp", "tensor") and rules["experts"] == ("data",)
    assert rules["vocab"] == ("tensor",)  # untouched defaults stay
    with pytest.raises(ValueError, match=r"config.mesh.rules.mlp = 'model'"):
        mesh_lib.logical_rules(dict(rules=dict(mlp="model")))


@pytest.mark.parametrize("variant, num_devices", [("gpu8", 8), ("v5e_64", 64), ("v5p_128", 64)])
def test_pod_configs_fit_their_slices(variant, num_devices):
    config = relevance_pod.get_config(variant)
    config_validation.validate(config, stages=main.STAGES, check_files=False)  # no Qwen folder here
    sizes = dict(zip(mesh_lib.MESH_AXES, mesh_lib.mesh_shape(config.mesh, num_devices)))
    batch_shards = sizes["data"] * sizes["fsdp"]
    assert config.optim.batch_size % batch_shards == 0
    assert config.eval.batch_size % batch_shards == 0
    assert config.rl.prompts_per_step * config.grpo.num_generations % batch_shards == 0
    model = decoder.DecoderConfig.from_config(config.model)
    assert (model.dtype, model.param_dtype) == ("bfloat16", "float32")  # bf16 compute, fp32 master weights
    config.model.hf_checkpoint = "elsewhere"  # one override moves weights and tokenizer together
    assert config.tokenizer.hf_checkpoint == "elsewhere"


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match=r"w: logical axis 'experts' has no sharding rule"):
        mesh_lib.mesh_spec(P("experts", "embed"), (4, 8), {"data": 1, "fsdp": 2, "tensor": 1}, name="w")


@pytest.fixture(scope="module")
def qwen_1p5b():
    """Logical axes and shapes of the real Qwen2.5-1.5B params (traced, never allocated)."""
    config = decoder.DecoderConfig.from_config(common.model_config("qwen2.5-1.5b"))
    shapes = jax.eval_shape(functools.partial(decoder.init_params, config), jax.random.key(0))
    return decoder.param_logical_axes(config), shapes


@pytest.mark.parametrize("axis_sizes, expected", [
    # tensor=2: the 2 kv heads split too.
    ({"data": 4, "fsdp": 8, "tensor": 2}, {
        "embed_tokens": P("tensor", "fsdp"),
        "layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor", None),
        "layers/self_attn/k_proj/kernel": P(None, "fsdp", "tensor", None),
        "layers/self_attn/k_proj/bias": P(None, "tensor", None),
        "layers/self_attn/o_proj/kernel": P(None, "tensor", None, "fsdp"),
        "layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
        "norm/scale": P("fsdp"),
    }),
    # tensor=4: 2 kv heads cannot split 4 ways and are replicated; 12 heads and 8960 mlp units can.
    ({"data": 1, "fsdp": 16, "tensor": 4}, {
        "embed_tokens": P("tensor", "fsdp"),
        "layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor", None),
        "layers/self_attn/k_proj/kernel": P(None, "fsdp", None, None),
        "layers/self_attn/v_proj/bias": P(None, None, None),
        "layers/mlp/gate_proj/kernel": P(None, "fsdp", "tensor"),
    }),
    # tensor=8: neither 12 heads nor 2 kv heads split 8 ways; 151936 vocab rows and 8960 mlp units do.
    ({"data": 1, "fsdp": 8, "tensor": 8}, {
        "embed_tokens": P("tensor", "fsdp"),
        "layers/self_attn/q_proj/kernel": P(None, "fsdp", None, None),
        "layers/self_attn/o_proj/kernel": P(None, None, None, "fsdp"),
        "layers/mlp/up_proj/kernel": P(None, "fsdp", "tensor"),
    }),
])
def test_real_shapes_shard_where_divisible_and_replicate_otherwise(qwen_1p5b, axis_sizes, expected, caplog):
    logical_axes, shapes = qwen_1p5b
    flat_axes = {_path_name(path): spec for path, spec in
                 jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=lambda x: isinstance(x, P))[0]}
    flat_shapes = {_path_name(path): leaf.shape
                   for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    with caplog.at_level(logging.INFO):
        specs = {name: mesh_lib.mesh_spec(flat_axes[name], flat_shapes[name], axis_sizes,
                                          name=name) for name in expected}
    assert specs == expected
    if axis_sizes["tensor"] == 4:
        assert "layers/self_attn/k_proj/kernel: dim 2 (kv_heads, size 2) is replicated" in caplog.text


def test_a_mesh_axis_shards_one_dim_only(caplog):
    rules = dict(mesh_lib.LOGICAL_RULES, vocab=("fsdp",))
    with caplog.at_level(logging.INFO):
        spec = mesh_lib.mesh_spec(P("vocab", "embed"), (128, 32), {"data": 1, "fsdp": 4, "tensor": 2}, rules,
                                  name="embed_tokens")
    assert spec == P("fsdp", None)
    assert "embed_tokens: dim 1 (embed) is replicated: mesh axes ['fsdp'] already shard another dim" in caplog.text


# --------------------------------------------------------------------------------------------------
# Sharded SFT step and GRPO update against one device
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parts():
    spec, settings, _, grpo_cfg, optimizer = worker.rl_parts()
    sft_step = sft.make_train_step(MODEL, optimizer, label_node=spec.root, num_nodes=spec.num_nodes,
                                   p_mask=0.3, mask_unit="token")
    update = rl.make_update(MODEL, grpo_cfg, spec, settings, optimizer)
    rng = np.random.default_rng(0)
    sft_batch = {"tokens": rng.integers(2, MODEL.vocab_size, (BATCH, LENGTH)).astype(np.int32),
                 "attention_mask": np.arange(LENGTH)[None, :] >= rng.integers(0, 4, (BATCH, 1)),
                 "loss_mask": np.tile(np.arange(LENGTH) >= 8, (BATCH, 1)),
                 "node_ids": np.tile(np.arange(LENGTH) % spec.num_nodes - 1, (BATCH, 1)).astype(np.int32)}
    prompt_tokens, prompt_mask = worker.prompts(0)
    completions = rng.integers(2, MODEL.vocab_size, (worker.NUM_ROWS, worker.NEW_TOKENS)).astype(np.int32)
    lengths = rng.integers(1, worker.NEW_TOKENS + 1, worker.NUM_ROWS)
    rl_batch, graph = worker.rollout_batch(spec, prompt_tokens, prompt_mask, completions, lengths,
                                           lengths == worker.NEW_TOKENS)
    return dict(sft_step=sft_step, update=update, sft_batch=sft_batch, rl_batch=rl_batch, graph=graph)


def _rl_inputs(state, ref_params, parts):
    return (state["params"], state["opt_state"], state["controller"].phi, parts["rl_batch"], parts["graph"],
            ref_params)


@pytest.fixture(scope="module")
def one_device(parts):
    """Initial state, SFT step and GRPO update results on one device, as host arrays."""
    state = jax.device_get(jax.jit(worker.init_state)())
    sft_state, sft_metrics = jax.jit(parts["sft_step"])(state, parts["sft_batch"])
    params, opt_state, g_phi, rl_metrics = jax.jit(parts["update"])(
        *_rl_inputs(state, state["params"], parts))
    return jax.device_get(dict(state=state, sft_state=sft_state, sft_metrics=sft_metrics, rl_params=params,
                               rl_opt_state=opt_state, g_phi=g_phi, rl_metrics=rl_metrics))


# Shard shapes each mesh must give (worked out by hand from the rules: vocab/heads/kv_heads/mlp over
# tensor, embed over fsdp, nothing over data).
EXPECTED_SHARDS = {
    (8, 1, 1): {"embed_tokens": (128, 32), "layers/self_attn/q_proj/kernel": (1, 32, 4, 8),
                "layers/self_attn/k_proj/bias": (1, 2, 8), "layers/mlp/down_proj/kernel": (1, 64, 32),
                "norm/scale": (32,)},
    (2, 2, 2): {"embed_tokens": (64, 16), "layers/self_attn/q_proj/kernel": (1, 16, 2, 8),
                "layers/self_attn/k_proj/bias": (1, 1, 8), "layers/mlp/down_proj/kernel": (1, 32, 16),
                "norm/scale": (16,)},
    (1, 4, 2): {"embed_tokens": (64, 8), "layers/self_attn/q_proj/kernel": (1, 8, 2, 8),
                "layers/self_attn/k_proj/bias": (1, 1, 8), "layers/mlp/down_proj/kernel": (1, 32, 8),
                "norm/scale": (8,)},
}


def _flat(tree) -> dict:
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module", params=MESHES, ids=lambda s: "x".join(map(str, s)))
def sharded(request, parts):
    """Sharded init, one SFT step and one GRPO update on a mesh (each compiled once per mesh)."""
    mesh = mesh_of(request.param)
    state, shardings = mesh_lib.sharded_init(worker.init_state, mesh, decoder.param_logical_axes(MODEL))
    initial = jax.device_get(state)
    layout = dict(params=jax.tree_util.tree_map(lambda x: x.sharding, state["params"]),
                  mu=jax.tree_util.tree_map(lambda x: x.sharding, state["opt_state"][1][0].mu),
                  rng=state["rng"].sharding, phi=state["controller"].phi.sharding)
    rl_state = jax.device_put(initial, shardings)  # the SFT step donates `state`, the update `rl_state`
    ref_params = jax.device_put(initial["params"], shardings["params"])
    sft_state, sft_metrics = mesh_lib.shard_step(parts["sft_step"], mesh, shardings)(state, parts["sft_batch"])
    update = mesh_lib.shard_rl_update(parts["update"], mesh, shardings["params"], shardings["opt_state"],
                                      reference=True)
    params, opt_state, g_phi, rl_metrics = update(*_rl_inputs(rl_state, ref_params, parts))
    return dict(shape=request.param, mesh=mesh, shardings=shardings, initial=initial, layout=layout,
                sft_state=sft_state, sft_metrics=sft_metrics, rl_params=params, rl_opt_state=opt_state,
                g_phi=g_phi, rl_metrics=rl_metrics)


def test_sharded_init_equals_one_device_init(sharded, one_device):
    assert max_abs_diff(sharded["initial"], one_device["state"]) == 0.0


def test_params_and_moments_are_split_as_the_rules_say(sharded):
    mesh, layout = sharded["mesh"], sharded["layout"]
    shapes = _flat(jax.eval_shape(worker.init_state)["params"])
    for name, shard_shape in EXPECTED_SHARDS[sharded["shape"]].items():
        sharding = _flat(layout["params"])[name]
        assert sharding.mesh == mesh and len(sharding.device_set) == 8
        assert sharding.shard_shape(shapes[name].shape) == shard_shape, name
    assert layout["mu"] == layout["params"]  # Adam's moments live with their params
    assert layout["rng"].is_fully_replicated and layout["phi"].is_fully_replicated
    for name, sharding in _flat(sharded["shardings"]["params"]).items():
        assert _flat(sharded["sft_state"]["params"])[name].sharding == sharding, name
        assert _flat(sharded["rl_params"])[name].sharding == sharding, name


def test_sft_step_matches_one_device(sharded, one_device):
    sft_state, metrics = sharded["sft_state"], sharded["sft_metrics"]
    reference = one_device["sft_metrics"]
    for key in ("sft/loss", "sft/grad_norm", "sft/supervised_tokens"):
        assert abs(float(metrics[key]) - float(reference[key])) <= TOLERANCE, key
    assert max_abs_diff(sft_state["params"], one_device["sft_state"]["params"]) <= TOLERANCE
    assert max_abs_diff(sft_state["opt_state"], one_device["sft_state"]["opt_state"]) <= TOLERANCE
    moved = max_abs_diff(sft_state["params"], one_device["state"]["params"])
    assert moved > 100 * TOLERANCE, "the step must move the params for the comparison to mean anything"


def test_microbatched_sft_step_on_a_mesh_matches_one_device(parts, one_device):
    """Two slices of 4 rows, each split over the data axis: the one-device, one-pass step's numbers."""
    mesh = mesh_of((2, 2, 2))
    state, shardings = mesh_lib.sharded_init(worker.init_state, mesh, decoder.param_logical_axes(MODEL))
    spec, _, _, _, optimizer = worker.rl_parts()
    step = sft.make_train_step(MODEL, optimizer, label_node=spec.root, num_nodes=spec.num_nodes, p_mask=0.3,
                               mask_unit="token", microbatches=2)
    sft_state, metrics = mesh_lib.shard_step(step, mesh, shardings)(state, parts["sft_batch"])
    for key in ("sft/loss", "sft/grad_norm", "sft/supervised_tokens"):
        assert abs(float(metrics[key]) - float(one_device["sft_metrics"][key])) <= TOLERANCE, key
    assert max_abs_diff(sft_state["params"], one_device["sft_state"]["params"]) <= TOLERANCE


def test_microbatched_grpo_update_on_a_mesh_matches_one_device(parts, one_device):
    """The update over two slices of rows (β > 0 and μ = 2: the reference and old log-probs too)."""
    mesh = mesh_of((2, 2, 2))
    state, shardings = mesh_lib.sharded_init(worker.init_state, mesh, decoder.param_logical_axes(MODEL))
    ref_params = jax.device_put(one_device["state"]["params"], shardings["params"])
    spec, settings, _, grpo_cfg, optimizer = worker.rl_parts()
    update = mesh_lib.shard_rl_update(rl.make_update(MODEL, grpo_cfg, spec, settings, optimizer, microbatches=2),
                                      mesh, shardings["params"], shardings["opt_state"], reference=True)
    params, _, g_phi, metrics = update(*_rl_inputs(state, ref_params, parts))
    for key in ("loss", "grad_norm", "kl"):
        assert abs(float(metrics[key]) - float(one_device["rl_metrics"][key])) <= TOLERANCE, key
    assert max_abs_diff(params, one_device["rl_params"]) <= TOLERANCE
    assert max_abs_diff(g_phi, one_device["g_phi"]) <= TOLERANCE


def test_rl_update_shardings_follow_its_signature():
    """Arguments are matched by name, so an update whose parameters come in another order is sharded right, and
    one with a parameter of no known sharding fails, naming it."""
    mesh = mesh_of((8, 1, 1))
    rep, split = mesh_lib.replicated(mesh), NamedSharding(mesh, P("data"))

    def reordered(phi, params, opt_state, graph, batch, ref_params):
        return params, opt_state, phi, {"rows": batch.sum()}

    update = mesh_lib.shard_rl_update(reordered, mesh, split, rep, reference=False)
    # φ has 3 entries: given the params' sharding (8 devices over its one axis) as a hand copy would, it fails.
    params, _, _, out = update(np.ones(3), np.zeros(8), np.zeros(2), np.zeros(1), np.arange(8.0), None)
    assert params.sharding == split and float(out["rows"]) == 28.0
    with pytest.raises(TypeError, match=r"parameters \['ref', 'extra'\] have no sharding"):
        mesh_lib.shard_rl_update(lambda params, opt_state, phi, batch, graph, ref, extra: None, mesh, rep, rep,
                                 reference=False)


def test_grpo_update_matches_one_device(sharded, one_device):
    reference = one_device["rl_metrics"]
    assert abs(float(sharded["rl_metrics"]["loss"]) - float(reference["loss"])) <= TOLERANCE
    assert abs(float(sharded["rl_metrics"]["grad_norm"]) - float(reference["grad_norm"])) <= TOLERANCE
    assert max_abs_diff(sharded["rl_params"], one_device["rl_params"]) <= TOLERANCE
    assert max_abs_diff(sharded["rl_opt_state"], one_device["rl_opt_state"]) <= TOLERANCE
    assert max_abs_diff(sharded["g_phi"], one_device["g_phi"]) <= TOLERANCE
    assert np.abs(one_device["g_phi"]).max() > 100 * TOLERANCE  # φ really receives a gradient
    assert max_abs_diff(sharded["rl_params"], one_device["state"]["params"]) > 100 * TOLERANCE


# --------------------------------------------------------------------------------------------------
# Checkpoints across device counts
# --------------------------------------------------------------------------------------------------

def _restore(directory, like, shardings):
    with checkpointing.Checkpointer(str(directory)) as ckpt:
        return ckpt.restore_latest(mesh_lib.with_shardings(like, shardings))


def test_checkpoint_moves_between_eight_devices_and_one(tmp_path, one_device):
    like = jax.eval_shape(worker.init_state)
    mesh = mesh_of((2, 2, 2))
    eight = mesh_lib.state_shardings(
        mesh, like, mesh_lib.param_shardings(mesh, like["params"], decoder.param_logical_axes(MODEL)))
    one = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(jax.devices()[0]), like)
    trained = one_device["sft_state"]

    with checkpointing.Checkpointer(str(tmp_path / "saved_on_eight"), async_save=False) as ckpt:
        ckpt.save(1, jax.device_put(trained, eight), force=True)
    restored = _restore(tmp_path / "saved_on_eight", like, one)
    assert jax.tree_util.tree_map(lambda x: x.sharding, restored.state) == one
    assert max_abs_diff(restored.state, trained) == 0.0

    with checkpointing.Checkpointer(str(tmp_path / "saved_on_one"), async_save=False) as ckpt:
        ckpt.save(1, jax.device_put(trained, one), force=True)
    restored = _restore(tmp_path / "saved_on_one", like, eight)
    assert jax.tree_util.tree_map(lambda x: x.sharding, restored.state) == eight
    assert len(restored.state["params"]["embed_tokens"].sharding.device_set) == 8
    assert max_abs_diff(restored.state, trained) == 0.0


# --------------------------------------------------------------------------------------------------
# Sampler, per-process input, distributed start-up
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [1, worker.GROUP])
def test_sharded_sampler_matches_generate(one_device, group_size):
    """Also with each group's prompt prefilled once: the rows of a group span two shards here."""
    mesh = mesh_of((2, 2, 2))
    params = one_device["state"]["params"]
    shardings = mesh_lib.param_shardings(mesh, params, decoder.param_logical_axes(MODEL))
    prompt_tokens, prompt_mask = worker.prompts(1)
    knobs = sampling.SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    rng = jax.random.PRNGKey(7)
    expected = sampling.generate(params, MODEL, prompt_tokens, prompt_mask, rng, max_new_tokens=worker.NEW_TOKENS,
                                 eos_ids=worker.EOS, pad_id=worker.PAD, sampling=knobs)
    generate = mesh_lib.shard_sampler(mesh, shardings, MODEL, max_new_tokens=worker.NEW_TOKENS,
                                      group_size=group_size)
    prompts = jax.device_put((prompt_tokens, prompt_mask), mesh_lib.batch_sharding(mesh))
    out = generate(jax.device_put(params, shardings), *prompts, rng, knobs, worker.EOS, worker.PAD)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_array_equal(out.lengths, expected.lengths)
    np.testing.assert_allclose(out.log_probs, expected.log_probs, atol=TOLERANCE)
    assert out.tokens.sharding.shard_shape(out.tokens.shape) == (worker.NUM_ROWS // 4, worker.NEW_TOKENS)
    right_padded = prompt_mask.copy()
    right_padded[0, -1] = False
    with pytest.raises(ValueError, match="left-padded"):
        generate(params, prompt_tokens, right_padded, rng, knobs, worker.EOS, worker.PAD)


def test_one_process_loads_the_whole_batch_as_one_global_array():
    mesh = mesh_of((2, 2, 2))
    assert mesh_lib.process_batch_slice(mesh, 8) == slice(0, 8)
    local = {"tokens": np.arange(24).reshape(8, 3)}
    batch = mesh_lib.global_batch(mesh, local, 8)
    np.testing.assert_array_equal(batch["tokens"], local["tokens"])
    assert batch["tokens"].sharding == NamedSharding(mesh, P(("data", "fsdp")))
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by the 4 batch shards"):
        mesh_lib.process_batch_slice(mesh, 6)


def test_host_arrays_become_global_arrays_in_their_shardings(one_device):
    mesh = mesh_of((1, 4, 2))
    params = one_device["state"]["params"]
    shardings = mesh_lib.param_shardings(mesh, params, decoder.param_logical_axes(MODEL))
    placed = mesh_lib.host_to_global(params, shardings)
    assert jax.tree_util.tree_map(lambda x: x.sharding, placed) == shardings
    assert max_abs_diff(placed, params) == 0.0


def test_no_distributed_start_without_config_or_environment(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert mesh_lib.maybe_initialize_distributed(common.mesh_config("data")) is False
    assert mesh_lib.maybe_initialize_distributed(None) is False
    assert not jax.distributed.is_initialized()
