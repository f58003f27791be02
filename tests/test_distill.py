"""Graph-node multi-head distillation: the loss against numpy, the teacher signals against the eval path and
hand-worked counts, the teacher file, and a MiniLM student that moves toward its teacher on every head."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import defaults, relevance
from graphgrpo_jax.data import batching, cot, esci, prepare
from graphgrpo_jax.eval import relevance as relevance_eval, student as student_eval
from graphgrpo_jax.models import decoder, encoder
from graphgrpo_jax import artifacts, metrics
from graphgrpo_jax.train import distill, evaluate

HEADS = ("y", "ms", "ma")
loss_fn = jax.jit(distill.distillation_loss, static_argnums=4)  # eager dispatch of each op is slower


def _config(**distill_overrides):
    config = relevance.get_config("micro")
    config.checkpoint.save_every = 0  # a MiniLM state is ~270 MB: save at the end only
    config.eval.batch_size = 24  # the policy's batch (teacher and judge): all 24 test pairs at once
    config.distill = defaults.distill()
    config.distill.update(max_length=32, batch_size=16, num_steps=12, log_every=6)
    config.distill.optim.update(learning_rate=1e-4, warmup_steps=0, schedule="constant")
    config.distill.update(**distill_overrides)
    return config


# ---------------------------------------------------------------------------------------------------------
# Loss


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference_loss(logits, teacher, has_teacher, gold_y, heads, weights, t, ce_weight):
    total = 0.0
    for node, lam in zip(heads, weights):
        kls = []
        for i in np.flatnonzero(has_teacher):
            p = teacher[node][i] ** (1 / t)
            p = p / p.sum()
            q = _softmax(logits[node][i] / t)
            kls.append(sum(pc * np.log(pc / qc) for pc, qc in zip(p, q) if pc > 0))
        total += lam * t * t * (np.mean(kls) if kls else 0.0)
    ce = np.mean([-np.log(_softmax(logits["y"][i])[g]) for i, g in enumerate(gold_y)])
    return total + ce_weight * ce, ce


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    sizes = {node: len(artifacts.STUDENT_NODE_VALUES[node]) for node in HEADS}
    logits = {node: rng.normal(size=(5, c)) * 2 for node, c in sizes.items()}
    teacher = {node: rng.dirichlet(np.ones(c), size=5) for node, c in sizes.items()}
    teacher["ms"][1] = [0.0, 0.7, 0.3, 0.0]  # zeros: 0·log 0 = 0
    has_teacher = np.array([True, True, False, True, True])
    gold_y = np.array([0, 3, 1, 2, 0])
    settings = distill.LossSettings(heads=HEADS, weights=(1.0, 0.5, 2.0), temperature=2.0, ce_weight=0.7)
    as_f32 = lambda tree: {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}
    args = (as_f32(logits), as_f32(teacher), jnp.asarray(has_teacher), jnp.asarray(gold_y))
    loss, logged = loss_fn(*args, settings)
    expected, expected_ce = _reference_loss(logits, teacher, has_teacher, gold_y, HEADS, settings.weights, 2.0, 0.7)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(logged["distill/ce"]) == pytest.approx(expected_ce, rel=1e-5)
    grads = jax.jit(jax.grad(lambda lg: distill.distillation_loss(lg, *args[1:], settings)[0]))(args[0])
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
    assert not np.asarray(grads["ms"])[2].any(), "a row without a teacher gets no KL gradient"

    single = distill.LossSettings(heads=("y",), weights=(1.0,), temperature=1.0, ce_weight=0.0)
    loss, _ = loss_fn(*args, single)
    assert float(loss) == pytest.approx(_reference_loss(logits, teacher, has_teacher, gold_y, ("y",), (1.0,), 1.0,
                                                        0.0)[0], rel=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"config.distill.heads .* label node"):
        distill.loss_settings(_config(heads=("ms", "ma")).distill)
    with pytest.raises(ValueError, match=r"config.distill.esci_path"):
        distill.loss_settings(_config(sources=("world", "esci")).distill)
    with pytest.raises(ValueError, match=r"config.distill.teacher"):
        distill.loss_settings(_config(teacher="oracle").distill)


# ---------------------------------------------------------------------------------------------------------
# Teacher signals


def test_sampled_frequencies_hand_worked():
    texts = [["<qs>a</qs><ms>match</ms><ma>partial</ma><y>Exact</y>",  # a full, valid chain
              "<ms>match</ms>",  # malformed, but it still wrote ms
              "<ms>bogus</ms><y>Irrelevant</y>"],  # ms not an allowed value
             ["no tags at all"]]
    probs = distill.sampled_value_probabilities(texts, artifacts.STUDENT_NODE_VALUES, smoothing=0.5)
    np.testing.assert_allclose(probs["ms"][0], np.array([2.5, 0.5, 0.5, 0.5]) / 4)
    np.testing.assert_allclose(probs["ma"][0], np.array([0.5, 1.5, 0.5]) / 2.5)
    np.testing.assert_allclose(probs["y"][0], np.array([1.5, 0.5, 0.5, 1.5]) / 4)
    for node, values in artifacts.STUDENT_NODE_VALUES.items():
        np.testing.assert_allclose(probs[node][1], np.full(len(values), 1 / len(values)))
    unsmoothed = distill.sampled_value_probabilities(texts, artifacts.STUDENT_NODE_VALUES, smoothing=0.0)
    np.testing.assert_allclose(unsmoothed["ms"][0], [1, 0, 0, 0])
    np.testing.assert_allclose(unsmoothed["ms"][1], [0.25] * 4)  # nothing written: uniform


def test_gold_teacher_is_the_worlds_node_values_one_hot(tmp_path):
    """`teacher = "gold"` needs no policy and writes no file: one-hot gold values of each split's pairs."""
    config = _config(teacher="gold")
    world = prepare.load_world(config)
    teacher = distill.ensure_teacher(config, str(tmp_path), world)
    for split in distill.TEACHER_SPLITS:
        pairs = world.split_pairs(split)
        for node, values in artifacts.STUDENT_NODE_VALUES.items():
            probs = teacher[split][node]
            assert probs.shape == (len(pairs), len(values))
            np.testing.assert_array_equal(probs.sum(1), 1.0)
            assert [values[i] for i in probs.argmax(1)] == [p.gold[node] for p in pairs]
    assert not (tmp_path / "distill").exists()


def test_node_prefix():
    assert distill.node_prefix([5, 6, 9, 7], open_id=9) == [5, 6]
    assert distill.node_prefix([5, 6, 7], open_id=9) == [5, 6, 7]
    assert distill.node_prefix([9, 5], open_id=9, label_first_label=True) == []


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The micro world's policy tokenizer (data stage) and a random tiny policy: the scoring is under test,
    not the policy's skill."""
    workdir = tmp_path_factory.mktemp("distill_policy")
    config = _config()
    prepare.run(config, str(workdir))
    params = decoder.init_params(decoder.DecoderConfig.from_config(config.model), jax.random.PRNGKey(0))
    return config, params, artifacts.load_tokenizer(config, str(workdir))


def test_forced_teacher_matches_the_eval_path_and_a_direct_score(policy):
    config, params, tokenizer = policy
    pairs = prepare.load_world(config).split_pairs("test")
    queries, titles = [p.query for p in pairs], [p.product_title for p in pairs]
    teacher = distill.policy_teacher(params, config, tokenizer, queries, titles)
    for node, values in artifacts.STUDENT_NODE_VALUES.items():
        assert teacher[node].shape == (len(pairs), len(values))

    # y: the eval stage's greedy judge scores the labels the same way.
    judge_probs = relevance_eval.judge(params, config, tokenizer, queries, titles, config.eval.batch_size).probs
    np.testing.assert_allclose(teacher["y"], judge_probs, atol=2e-5)

    # ms, ma: score each value directly on prompt + greedy prefix + <v>value</v> without left padding, the
    # response cut to its last max_response_len tokens as the eval path does.
    model_config = decoder.DecoderConfig.from_config(config.model)
    prompt = tokenizer(cot.prompt_text(pairs[0].query, pairs[0].product_title))["input_ids"]
    enc = batching.encode_prompts(tokenizer, [cot.prompt_text(q, t) for q, t in zip(queries, titles)],
                                  config.data.max_prompt_len)  # the teacher's batch shape: no new compile
    response = distill.greedy_responses(params, model_config, tokenizer, enc["tokens"],
                                        enc["attention_mask"].astype(bool), config.data.max_response_len)[0]
    sequences, scored = [], []  # one right-padded batch: padding after a sequence changes none of its scores
    for node in ("ms", "ma"):
        open_id, close_id = tokenizer.convert_tokens_to_ids([f"<{node}>", f"</{node}>"])
        prefix = response[:response.index(open_id)] if open_id in response else response
        for value in artifacts.STUDENT_NODE_VALUES[node]:
            value_ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            sequences.append(prompt + (prefix + [open_id, *value_ids, close_id])[-config.data.max_response_len:])
            scored.append(len(value_ids) + 1)
    length = max(map(len, sequences))
    tokens = np.asarray([s + [tokenizer.pad_token_id] * (length - len(s)) for s in sequences], np.int32)
    mask = np.arange(length)[None, :] < np.asarray([len(s) for s in sequences])[:, None]
    logp = np.asarray(decoder.token_log_probs(params, model_config, tokens, mask), np.float64)
    scores = [logp[i, len(s) - n:len(s)].sum() for i, (s, n) in enumerate(zip(sequences, scored))]
    np.testing.assert_allclose(teacher["ms"][0], _softmax(np.asarray(scores[:4])), atol=2e-5)
    np.testing.assert_allclose(teacher["ma"][0], _softmax(np.asarray(scores[4:])), atol=2e-5)


# ---------------------------------------------------------------------------------------------------------
# The teacher file


def _gold_teacher(world, sharpness: float = 0.7) -> distill.Teacher:
    """Synthetic teacher beliefs: `sharpness` on the gold value, the rest spread evenly."""
    teacher = {}
    for split in distill.TEACHER_SPLITS:
        pairs = world.split_pairs(split)
        teacher[split] = {}
        for node, values in artifacts.STUDENT_NODE_VALUES.items():
            probs = np.full((len(pairs), len(values)), (1 - sharpness) / len(values), np.float32)
            probs[np.arange(len(pairs)), [values.index(p.gold[node]) for p in pairs]] += sharpness
            teacher[split][node] = probs
    return teacher


def test_teacher_file_round_trip_and_reuse(tmp_path):
    config = _config()
    world = prepare.load_world(config)
    teacher, meta = _gold_teacher(world), distill.teacher_meta(config, world)
    path = artifacts.distill_teacher_path(str(tmp_path))
    distill.save_teacher(path, teacher, meta)
    assert sorted(p.name for p in (tmp_path / "distill").iterdir()) == ["teacher.npz"]  # no temporary left
    loaded, loaded_meta = distill.load_teacher(path)
    assert loaded_meta == json.loads(json.dumps(meta))
    for split in teacher:
        for node in teacher[split]:
            np.testing.assert_array_equal(loaded[split][node], teacher[split][node])

    # Reused without a policy (this workdir has none), refused for another teacher.
    reused = distill.ensure_teacher(config, str(tmp_path), world)
    np.testing.assert_array_equal(reused["test"]["ma"], teacher["test"]["ma"])
    with pytest.raises(ValueError, match=r"teacher.npz was computed with other \['num_samples', .*'teacher'"):
        distill.ensure_teacher(_config(teacher="samples"), str(tmp_path), world)

    broken = {**teacher, "test": {**teacher["test"], "ms": teacher["test"]["ms"][:, :3]}}
    distill.save_teacher(path, broken, meta)
    with pytest.raises(ValueError, match=r"test/ms has shape \(\d+, 3\), expected \(\d+, 4\)"):
        distill.load_teacher(path)


# ---------------------------------------------------------------------------------------------------------
# The stage


def _write_esci(path, rng):
    """A tiny flat ESCI file: 12 queries, 2 products each; labels skewed so the majority is clear."""
    rows = []
    for q in range(12):
        for k in range(2):
            label = "EEESI"[rng.integers(5)] if k == 0 else "IC"[q % 2]
            rows.append({"query_id": q, "query": f"query {q}", "product_id": f"P{q}{k}",
                         "product_title": f"product {q} {k}", "esci_label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_distillation_lowers_held_out_kl_on_every_head(tmp_path):
    esci_path = tmp_path / "esci.jsonl"
    _write_esci(esci_path, np.random.default_rng(0))
    config = _config(sources=("world", "esci"), esci_path=str(esci_path), esci_test_fraction=0.5)
    world = prepare.load_world(config)
    teacher = _gold_teacher(world)
    workdir = tmp_path / "work"
    distill.save_teacher(artifacts.distill_teacher_path(str(workdir)), teacher, distill.teacher_meta(config, world))

    report = distill.run(config, str(workdir))

    encoder_config = artifacts.student_config()
    tokenizer = encoder.load_pair_tokenizer(encoder.minilm_folder())
    pairs = world.split_pairs("test")
    initial = encoder.head_probabilities(distill.init_student(encoder_config, HEADS, config.seed),
                                                 encoder_config, tokenizer, [p.query for p in pairs],
                                                 [p.product_title for p in pairs], max_length=32, batch_size=16)
    kl = report["synthetic_test"]["held_out_kl"]
    for node in HEADS:
        before = student_eval.kl_divergence(teacher["test"][node], initial[node]).mean()
        assert kl[node] < 0.95 * before, (node, kl[node], before)
    assert set(report["synthetic_test"]["per_node_accuracy"]) == set(HEADS)

    data = esci.read_flat_jsonl(esci_path, test_fraction=0.5)
    train_labels = [e.label for e in data.split("train")]
    majority = max(cot.LABELS, key=train_labels.count)
    test_labels = [e.label for e in data.split("test")]
    assert report["esci_test"]["majority"]["majority_label"] == majority
    expected_accuracy = test_labels.count(majority) / len(test_labels)
    assert report["esci_test"]["majority"]["accuracy"] == pytest.approx(expected_accuracy)
    assert report["esci_test"]["student"]["num_examples"] == len(test_labels)

    rows = metrics.read_jsonl(str(workdir / "distill" / "metrics.jsonl"))
    assert [r["step"] for r in rows if "distill/loss" in r] == [6, 12]
    assert all(f"distill/kl/{node}" in rows[-1] for node in HEADS)
    saved = json.loads((workdir / "distill" / "report.json").read_text())
    assert saved["synthetic_test"]["held_out_kl"] == kl
    assert saved["esci_test"]["majority"]["accuracy"] == report["esci_test"]["majority"]["accuracy"]

    # The checkpoint restores to the student that was evaluated.
    restored = artifacts.student_params(config, str(workdir))
    probs = encoder.head_probabilities(restored, encoder_config, tokenizer, [p.query for p in pairs],
                                               [p.product_title for p in pairs], max_length=32, batch_size=16)
    for node in HEADS:
        assert student_eval.kl_divergence(teacher["test"][node], probs[node]).mean() == pytest.approx(kl[node],
                                                                                                     rel=1e-5)

    # The eval-only mode scores the same held-out ESCI rows with the saved student, from the run's config.
    (workdir / "config.json").write_text(config.to_json())
    eval_config = relevance.get_config("eval_file")
    eval_config.eval.update(input_path=str(esci_path), input_split="test", input_test_fraction=0.5,
                            checkpoint_workdir=str(workdir), policies=("student",))
    evaluated = evaluate.run_file(eval_config, str(tmp_path / "eval_only"))
    assert evaluated["num_rows"] == len(test_labels)
    assert evaluated["student"]["accuracy"] == pytest.approx(report["esci_test"]["student"]["accuracy"])
    assert evaluated["student"]["macro_f1"] == pytest.approx(report["esci_test"]["student"]["macro_f1"])
