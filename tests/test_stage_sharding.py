"""The pipeline's stages on a device mesh: `main.run` of the micro relevance config's SFT and RL stages on
the fake 8-device CPU mesh (2, 2, 2) must log the losses, draw the tokens and end with the params of the
same run on one device, with the params really split over the 8 devices.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import relevance
from graphgrpo_jax import main, mesh as mesh_lib, metrics
from graphgrpo_jax.train import loop

TOLERANCE = 1e-5
STAGES = ("sft", "rl")
SHARDED_MESH = dict(data=2, fsdp=2, tensor=2)


def _config(mesh: dict):
    config = relevance.get_config("micro")
    config.stages = ("data", *STAGES)
    config.mesh.update(mesh)
    config.grpo.beta = 0.01  # a KL reference: its own copy of the SFT params, sharded like the policy
    config.checkpoint.save_every = 0  # only the final checkpoints: saving is not what this test is about
    return config


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per mesh ("single", "sharded"): the workdir, each stage's final state and every RL step's samples."""
    results = {}
    fit, shard_sampler = loop.fit, mesh_lib.shard_sampler
    for name, mesh in (("single", {}), ("sharded", SHARDED_MESH)):
        states, samples = {}, []

        def recording_fit(state, step_fn, batch_fn, *, stage, **kwargs):
            states[stage] = fit(state, step_fn, batch_fn, stage=stage, **kwargs)
            return states[stage]

        def recording_sampler(*args, **kwargs):
            generate = shard_sampler(*args, **kwargs)

            def run(params, *inputs):
                out = generate(params, *inputs)
                samples.append(jax.device_get(out))
                return out

            return run

        workdir = tmp_path_factory.mktemp(name)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loop, "fit", recording_fit)
            patch.setattr(mesh_lib, "shard_sampler", recording_sampler)
            main.run(_config(mesh), str(workdir))
        results[name] = dict(workdir=workdir, states=states, samples=samples)
    return results


def test_losses_and_metrics_match_one_device(runs):
    for stage in STAGES:
        single, sharded = (metrics.read_jsonl(str(runs[name]["workdir"] / stage / "metrics.jsonl"))
                           for name in ("single", "sharded"))
        assert [row["step"] for row in sharded] == [row["step"] for row in single] != []
        loss_key = f"{stage}/loss"
        assert all(loss_key in row for row in single)
        for one, eight in zip(single, sharded):
            assert one.keys() == eight.keys()
            for key in {key for key in one.keys() if not key.startswith("time/")} - {"step"}:  # wall times differ
                where = (stage, one["step"], key)
                if isinstance(one[key], str):  # a non-finite value, written as its repr
                    assert eight[key] == one[key], where
                else:
                    assert eight[key] == pytest.approx(one[key], abs=TOLERANCE, rel=TOLERANCE), where


def test_rl_draws_the_same_tokens(runs):
    single, sharded = runs["single"]["samples"], runs["sharded"]["samples"]
    assert len(single) == len(sharded) == relevance.get_config("micro").rl.num_steps
    for one, eight in zip(single, sharded):
        np.testing.assert_array_equal(eight.tokens, one.tokens)
        np.testing.assert_array_equal(eight.lengths, one.lengths)
        np.testing.assert_allclose(eight.log_probs, one.log_probs, atol=TOLERANCE)
    assert len({one.tokens.tobytes() for one in single}) == len(single)  # each step samples afresh


@pytest.mark.parametrize("stage", STAGES)
def test_final_params_match_one_device(runs, stage):
    single, sharded = (_flat(jax.device_get(runs[name]["states"][stage]["params"])) for name in ("single", "sharded"))
    assert single.keys() == sharded.keys()
    for name, value in single.items():
        np.testing.assert_allclose(sharded[name], value, rtol=0, atol=TOLERANCE, err_msg=name)


@pytest.mark.parametrize("stage", STAGES)
def test_sharded_run_splits_params_over_the_mesh(runs, stage):
    one_device = _flat(runs["single"]["states"][stage]["params"])
    params = _flat(runs["sharded"]["states"][stage]["params"])
    assert all(len(x.sharding.device_set) == 1 for x in one_device.values())
    for x in params.values():
        assert len(x.sharding.device_set) == 8
    # Worked out from the rules: vocab and heads over `tensor`, embed over `fsdp`; 1024 x 64 embeddings.
    embed = params["['embed_tokens']"]
    assert embed.sharding.spec == P("tensor", "fsdp")
    assert embed.sharding.shard_shape(embed.shape) == (512, 32)
    q_proj = params["['layers']['self_attn']['q_proj']['kernel']"]
    assert q_proj.sharding.spec == P(None, "fsdp", "tensor", None)
    assert sum(x.addressable_shards[0].data.size < x.size for x in params.values()) > len(params) // 2
