"""Query rewriting: reward wiring of the RL task, the tagging judge, the offline metrics against
hand-computed values on the micro world, multi-task SFT batches, and the pipeline end to end
(data → index → multi-task SFT → fused-reward GRPO → eval) on the micro config."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rewrite as rewrite_configs
from graphgrpo_jax import artifacts, checkpointing, main, metrics
from graphgrpo_jax.data import cot, prepare, world as world_lib
from graphgrpo_jax.eval import rewrite as rewrite_eval
from graphgrpo_jax.models import decoder, encoder
from graphgrpo_jax.tasks import rewrite as rewrite_task
from graphgrpo_jax.search.engine import MANIFEST
from graphgrpo_jax.train import distill, rewrite


@pytest.fixture(scope="module")
def config():
    return rewrite_configs.get_config("micro")


@pytest.fixture(scope="module")
def world(config):
    return prepare.load_world(config)


class FakeEngine:
    """A retriever with hand-made result lists (nothing for any other query)."""

    def __init__(self, hits: dict[str, list[str]]):
        self.hits = hits

    def search_batch(self, queries, k):
        return [[(pid, 1.0) for pid in self.hits.get(query, [])[:k]] for query in queries]


def _query_with(world, predicate):
    return next(q for q in world.split_queries("train") if predicate(q))


# ------------------------------------------------------------------------------------ reward wiring


@pytest.fixture(scope="module")
def wiring_case(world):
    """A training query with attributes and two purchases, four rewrites of it, hits and judge answers."""
    query = _query_with(world, lambda q: q.attributes and len(q.purchased_product_ids) == 2
                        and q.text.replace(" ", "").isalnum())
    bought = list(query.purchased_product_ids)
    word = query.subject.split()[-1]
    rewrites = [query.gold_rewrite, query.subject, query.text, f"{word} {word} {word}"]
    hits = {rewrites[0]: [bought[0], "p99999", bought[1]], rewrites[1]: [bought[1]], rewrites[2]: [bought[0]]}
    tag_probs = {rewrites[0]: [1.0, 0.0, 0.0], rewrites[1]: [0.2, 0.6, 0.2], rewrites[2]: [0.0, 0.0, 1.0],
                 rewrites[3]: [0.0, 1.0, 0.0]}

    def judge(queries, texts):
        assert set(queries) == {query.text}
        return np.array([tag_probs[text] for text in texts])

    return query, rewrites, FakeEngine(hits), judge


def _score(world, case, fusion="rfusion", queries=None):
    query, rewrites, engine, judge = case
    task_config = rewrite_configs.get_config("micro")
    task_config.rewrite.fusion = fusion
    task = rewrite_task.RewriteTask.for_world(task_config, world, engine=engine, judge=judge)
    if queries is not None:
        task.queries = queries
    row = [q.query_id for q in task.queries].index(query.query_id)
    offsets = [np.zeros((n, 2), np.int64) for n in (3, 5, 1, 7)]
    return task, task.score(np.full(4, row), rewrites, offsets)


def test_fused_reward_and_logs_hand_computed(world, wiring_case):
    query, rewrites, _, _ = wiring_case
    task, scored = _score(world, wiring_case)
    assert task.prompts()[0] == f"query: {world.split_queries('train')[0].text} rewrite:"
    # r_rule: gold and subject-only pass; the copy and the triple word fail.
    # r_rel: 1, 0.2 + 0.5 * 0.6, 0, 0.5;  r_conv (recall@10 of 2 purchases): 1, 0.5, 0.5, 0.
    r_rel, r_conv, r_rule = np.array([1.0, 0.5, 0.0, 0.5]), np.array([1.0, 0.5, 0.5, 0.0]), np.array([1, 1, 0, 0])
    np.testing.assert_allclose(scored.rewards, r_rule * (0.5 * r_rel + 0.5 * r_conv), atol=1e-7)
    assert scored.rewards.dtype == np.float32
    np.testing.assert_array_equal(scored.format_valid, [True, True, False, False])
    words = [len(text.split()) for text in rewrites]
    assert scored.metrics == pytest.approx({
        "rl/reward_rel": r_rel.mean(), "rl/reward_conv": r_conv.mean(), "rl/reward_rule": 0.5,
        "rl/rule_failure_rate": 0.5, "rl/reward_not_applicable": 0.0,
        "rl/accuracy": 0.25,  # only the gold rewrite reads back as the query's intent
        "rl/rewrite_words": np.mean(words)})


def test_outcome_credit_layout(world, wiring_case):
    _, scored = _score(world, wiring_case)
    np.testing.assert_array_equal(scored.node_values, np.full((4, 1), -1))
    assert [ids.tolist() for ids in scored.node_ids] == [[-1] * n for n in (3, 5, 1, 7)]
    assert scored.gold_label is None


def test_single_reward_variants_and_rewards_that_do_not_apply(world, wiring_case):
    query = wiring_case[0]
    _, scored = _score(world, wiring_case[:3] + (None,), fusion="conv")  # no judge needed
    np.testing.assert_allclose(scored.rewards, [1.0, 0.5, 0.5, 0.0])  # ungated by the rules
    assert "rl/reward_rel" not in scored.metrics and scored.metrics["rl/rule_failure_rate"] == 0.5
    # A query nobody bought from: r_conv does not apply, the group gets reward 0 (no advantage).
    unbought = [dataclasses.replace(q, purchased_product_ids=()) if q.query_id == query.query_id else q
                for q in world.split_queries("train")]
    _, scored = _score(world, wiring_case[:3] + (None,), fusion="conv", queries=unbought)
    np.testing.assert_array_equal(scored.rewards, np.zeros(4))
    assert scored.metrics["rl/reward_not_applicable"] == 1.0


def test_task_rejects_an_unknown_fusion(world):
    config = rewrite_configs.get_config("micro")
    config.rewrite.fusion = "average"
    with pytest.raises(ValueError, match="config.rewrite.fusion = 'average'"):
        rewrite_task.RewriteTask.for_world(config, world, engine=FakeEngine({}), judge=None)


# ------------------------------------------------------------------------------------ offline metrics


def test_relevance_grade_agrees_with_every_judged_pair(world):
    for pair in world.pairs:
        query = world.query_by_id[pair.query_id]
        grade = world_lib.relevance_grade(world, query.subject, query.attributes,
                                             world.product_by_id[pair.product_id])
        assert grade == {"Exact": 3, "Substitute": 2, "Complement": 1, "Irrelevant": 0}[pair.label], pair


@pytest.fixture(scope="module")
def graded_hits(world):
    """A training query with two purchases and five hits for its gold rewrite, graded 3, 2, 2, 1, 0."""
    types = world.types
    query = _query_with(world, lambda q: q.attributes and len(q.purchased_product_ids) == 2
                        and types[q.subject].substitutes and types[q.subject].complements)
    ptype = types[query.subject]
    related = {query.subject, *ptype.substitutes, *ptype.complements}
    by_kind = {
        "same type, an attribute wrong": lambda p: p.product_type == query.subject and any(
            p.attributes[key] != value for key, value in query.attributes.items()),
        "substitute type": lambda p: p.product_type in ptype.substitutes,
        "complement type": lambda p: p.product_type in ptype.complements,
        "unrelated type": lambda p: p.product_type not in related,
    }
    picked = [next(p.product_id for p in world.products if is_kind(p)) for is_kind in by_kind.values()]
    return query, [query.purchased_product_ids[0], *picked]


def test_rewrite_metrics_hand_computed(world, graded_hits):
    query, hits = graded_hits
    other = world.split_queries("train")[0]
    engine = FakeEngine({query.gold_rewrite: hits})
    report = rewrite_eval.rewrite_metrics(world, engine, [query, other], [query.gold_rewrite, ""], k=5)
    assert report["num_examples"] == 2 and report["k"] == 5
    assert report["accuracy"] == 0.5  # the gold rewrite keeps the intent, an empty one does not
    assert report["recall"] == pytest.approx((1 / 2 + 0.0) / 2)
    assert report["relevance"] == pytest.approx((8 / 5 + 0.0) / 2)
    # Top 2 only; an empty slot of the top 5 counts 0.
    short = rewrite_eval.rewrite_metrics(world, engine, [query], [query.gold_rewrite], k=2)
    assert (short["recall"], short["relevance"]) == (0.5, pytest.approx(5 / 2))
    sparse = rewrite_eval.rewrite_metrics(world, FakeEngine({"x": hits[:2]}), [query], ["x"], k=5)
    assert sparse["relevance"] == pytest.approx(5 / 5)


def test_keeps_intent_reads_the_rewrite(world):
    query = _query_with(world, lambda q: len(q.attributes) >= 2 and "size" not in q.attributes)
    assert world_lib.keeps_intent(world, query, query.gold_rewrite)
    reordered = " ".join([query.subject, *reversed([query.attributes[k] for k in sorted(query.attributes)])])
    assert reordered != query.gold_rewrite and world_lib.keeps_intent(world, query, reordered)
    assert not world_lib.keeps_intent(world, query, query.subject)  # facets dropped
    assert not world_lib.keeps_intent(world, query, "")


def test_judge_metrics_against_the_worlds_rule(world):
    """A judge that calls everything relevant: right exactly on the truly relevant pairs."""
    tags = world.split_rewrite_tags("test")[:9]
    queries = world.split_queries("test")[:3]
    rewrites = [queries[0].gold_rewrite, queries[1].subject if queries[1].attributes else "", "zzz"]
    truth = [world_lib.true_tag(world, q, r) for q, r in zip(queries, rewrites)]
    assert truth[0] == "relevant" and truth[2] == "irrelevant"
    assert truth[1] == ("partial" if queries[1].attributes else "irrelevant")  # facets dropped / no type named
    always_relevant = lambda qs, rs: np.tile([1.0, 0.0, 0.0], (len(qs), 1))
    assert rewrite_eval.tag_accuracy(always_relevant, tags) == pytest.approx(
        np.mean([t.tag == "relevant" for t in tags]))
    report = rewrite_eval.judge_metrics(always_relevant, world, queries, rewrites)
    assert report == pytest.approx({"own_tag_accuracy": 1 / 3, "own_p_relevant": 1.0, "own_truly_relevant": 1 / 3})


def test_rule_judge_is_the_worlds_rule_one_hot(world):
    """The oracle r_rel judge of the ablations: one-hot tags by the world's rule on training queries."""
    queries = world.split_queries("train")[:2]
    judge = rewrite_task.RuleJudge(world)
    probs = judge([q.text for q in queries] * 2, [q.gold_rewrite for q in queries] + ["zzz", "zzz"])
    relevant, irrelevant = (cot.REWRITE_TAGS.index(tag) for tag in ("relevant", "irrelevant"))
    np.testing.assert_array_equal(probs.argmax(1), [relevant, relevant, irrelevant, irrelevant])
    np.testing.assert_array_equal(probs.sum(1), 1.0)
    config = rewrite_configs.get_config("micro")
    config.rewrite.judge = "oracle"
    with pytest.raises(ValueError, match="config.rewrite.judge = 'oracle'"):
        rewrite_task.RewriteTask.from_workdir(config, world, "unused", load_sft_params=None)


class CountingGrader:
    """Wraps a grader and records the pairs it is asked for."""

    def __init__(self, grade):
        self.grade, self.calls = grade, []

    def __call__(self, queries, product_ids):
        self.calls.append(list(zip(queries, product_ids)))
        return self.grade(queries, product_ids)


def test_retrieval_judge_grades_what_the_rewrite_retrieves(world, graded_hits):
    """The oracle retrieval judge is the offline relevance@k / 3 of each rewrite; new pairs only are graded."""
    query, hits = graded_hits
    engine = FakeEngine({"found": hits, "two": hits[3:]})
    grader = CountingGrader(rewrite_task.rule_grader(world))
    judge = rewrite_task.RetrievalJudge(engine, 5, grader)
    scores = judge([query.text] * 3, ["found", "nothing", "two"])
    np.testing.assert_allclose(scores, [8 / 15, 0.0, 1 / 15])  # grades 3+2+2+1+0; none; 1+0, empty slots 0
    for text, score in zip(["found", "two"], scores[[0, 2]]):
        report = rewrite_eval.rewrite_metrics(world, engine, [query], [text], k=5)
        assert report["relevance"] == pytest.approx(3 * score)
    assert grader.calls == [[(query.text, pid) for pid in hits]]  # hits[3:] are among them: graded once
    other = next(q for q in world.split_queries("train") if q.text != query.text)
    np.testing.assert_allclose(judge([query.text, other.text], ["found", "found"])[0], 8 / 15)
    assert grader.calls[1] == [(other.text, pid) for pid in hits]
    np.testing.assert_allclose(rewrite_task.RetrievalJudge(engine, 2, grader)([query.text], ["found"]), [5 / 6])
    with pytest.raises(ValueError, match="k must be >= 1"):
        rewrite_task.RetrievalJudge(engine, 0, grader)


# ------------------------------------------------------------------------------------ multi-task SFT


@pytest.mark.parametrize("mix, batch, expected", [
    ({"rewrite": 1.0, "tag": 1.0}, 8, {"rewrite": 4, "tag": 4}),
    ({"rewrite": 2.0, "tag": 1.0}, 8, {"rewrite": 5, "tag": 3}),  # 5.33 / 2.67: the larger remainder
    ({"rewrite": 1.0, "tag": 0.0}, 8, {"rewrite": 8, "tag": 0}),  # single-task SFT
    ({"tag": 1.0}, 3, {"rewrite": 0, "tag": 3}),
])
def test_task_counts(mix, batch, expected):
    assert rewrite_task.task_counts(mix, batch) == expected


@pytest.mark.parametrize("mix, message", [
    ({"rewrite": 1.0, "tags": 1.0}, "unknown tasks \\['tags'\\]"),
    ({"rewrite": -1.0, "tag": 2.0}, "weights must be >= 0"),
    ({"rewrite": 0.0, "tag": 0.0}, "positive sum"),
])
def test_task_counts_bad_mix(mix, message):
    with pytest.raises(ValueError, match=message):
        rewrite_task.task_counts(mix, 8)


def test_sft_examples(world):
    examples = rewrite_task.sft_examples(world, "train")
    queries, tags = world.split_queries("train"), world.split_rewrite_tags("train")
    assert examples["rewrite"] == ([f"query: {q.text} rewrite:" for q in queries], [q.gold_rewrite for q in queries])
    prompts, answers = examples["tag"]
    assert prompts[0] == f"query: {tags[0].query} rewrite: {tags[0].rewrite} tag:"
    assert answers == [t.tag for t in tags] and set(answers) == set(cot.REWRITE_TAGS)


def test_labelled_queries_split_sft_from_rl(world):
    """SFT sees a stable share of the training queries (and their tags); RL can take exactly the rest."""
    queries = world.split_queries("train")
    examples = rewrite_task.sft_examples(world, "train", labelled_fraction=0.3)
    labelled = {q.query_id for q in queries if rewrite_task.is_labelled(q.query_id, 0.3)}
    assert examples["rewrite"][1] == [q.gold_rewrite for q in queries if q.query_id in labelled]
    assert examples["tag"][1] == [t.tag for t in world.split_rewrite_tags("train") if t.query_id in labelled]
    assert abs(len(labelled) / len(queries) - 0.3) < 3 * (0.3 * 0.7 / len(queries)) ** 0.5 + 0.02
    assert all(rewrite_task.is_labelled(q.query_id, 1.0) for q in queries)

    # Tags are cheaper than teacher rewrites: a larger tagged share keeps the same rewrites, adds tags.
    wider = rewrite_task.sft_examples(world, "train", labelled_fraction=0.3, tagged_fraction=0.8)
    tagged = {q.query_id for q in queries if rewrite_task.is_labelled(q.query_id, 0.8)}
    assert labelled < tagged and wider["rewrite"] == examples["rewrite"]
    assert wider["tag"][1] == [t.tag for t in world.split_rewrite_tags("train") if t.query_id in tagged]
    with pytest.raises(ValueError, match="tagged_fraction = 0.2 is below labelled_fraction = 0.3"):
        rewrite_task.sft_examples(world, "train", labelled_fraction=0.3, tagged_fraction=0.2)

    config = rewrite_configs.get_config("micro")
    config.rewrite_sft.labelled_fraction = 0.3
    config.rewrite.rl_queries = "unlabelled"
    task = rewrite_task.RewriteTask.for_world(config, world, engine=FakeEngine({}), judge=None)
    assert {q.query_id for q in task.queries} == {q.query_id for q in queries} - labelled
    config.rewrite_sft.labelled_fraction = 1.0
    with pytest.raises(ValueError, match="no training queries left for RL"):
        rewrite_task.RewriteTask.for_world(config, world, engine=FakeEngine({}), judge=None)
    with pytest.raises(ValueError, match="labelled_fraction = 0"):
        rewrite_task.is_labelled("q1", 0.0)


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, config):
    workdir = tmp_path_factory.mktemp("rewrite")
    main.run(config, str(workdir))
    return workdir


def test_every_stage_leaves_its_outputs(pipeline):
    assert (pipeline / "index" / MANIFEST).exists()
    for stage, last in (("sft", 6), ("rl", 2)):
        with checkpointing.Checkpointer(artifacts.checkpoint_dir(str(pipeline), stage)) as ckpt:
            assert ckpt.all_steps()[-1] == last
    rows = metrics.read_jsonl(str(pipeline / "rl" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    expected = ["rl/reward", "rl/reward_rel", "rl/reward_conv", "rl/reward_rule", "rl/rule_failure_rate",
                "rl/rewrite_words", "rl/accuracy", "rl/loss", "rl/completions/mean_length",
                "credit/adv_mean/rewrite"]
    for row in rows:
        assert not [k for k in expected if k not in row]
        assert 0.0 <= row["rl/reward"] <= 1.0 and 0.0 <= row["rl/reward_rel"] <= 1.0


def test_eval_reports_every_policy_next_to_raw_and_gold(pipeline, config, world):
    results = json.loads((pipeline / "rewrite_eval" / "metrics.json").read_text())
    assert sorted(results) == sorted(f"{name}/{split}" for name in ("raw", "gold", "sft", "rl")
                                     for split in ("test", "ood"))
    for report in results.values():
        assert report["num_examples"] == 8 and report["k"] == 10
        assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
        assert 0.0 <= report["relevance"] <= 3.0
    assert results["gold/test"]["accuracy"] == results["gold/ood"]["accuracy"] == 1.0
    for policy in ("sft/test", "rl/test"):  # the multi-task policy doubles as the r_rel judge
        assert set(results[policy]["judge"]) == {"tag_accuracy", "own_tag_accuracy", "own_p_relevant",
                                                 "own_truly_relevant"}
        assert all(0.0 <= value <= 1.0 for value in results[policy]["judge"].values())
    # Raw-query recall, recomputed straight from the engine.
    engine = rewrite.build_index(config, str(pipeline))
    queries = world.split_queries("test")[:8]
    recalls = [len(set(q.purchased_product_ids) & {pid for pid, _ in engine.search(q.text, 10)})
               / len(q.purchased_product_ids) for q in queries]
    assert results["raw/test"]["recall"] == pytest.approx(np.mean(recalls))


def test_index_is_reused_and_checked_against_the_world(pipeline, config):
    manifest = pipeline / "index" / MANIFEST
    before = os.stat(manifest).st_mtime_ns
    rewrite.build_index(config, str(pipeline))
    assert os.stat(manifest).st_mtime_ns == before
    other = rewrite_configs.get_config("micro")
    other.world.products_per_type = 17
    with pytest.raises(ValueError, match="indexes 624 products but the catalogue of this config has 663"):
        rewrite.build_index(other, str(pipeline))


def test_rl_moved_the_policy_away_from_sft(pipeline, config):
    sft_params, rl_params = (artifacts.policy_params(config, str(pipeline), stage) for stage in ("sft", "rl"))
    distance = sum(float(jnp.abs(a - b).sum()) for a, b in
                   zip(jax.tree_util.tree_leaves(sft_params), jax.tree_util.tree_leaves(rl_params)))
    assert distance > 0


def test_tag_judge_matches_unpadded_forced_decoding(pipeline, config, world):
    """The batched judge against a reference that scores each (prompt, tag, EOS) row right-padded."""
    tokenizer = artifacts.load_tokenizer(config, str(pipeline))
    model_config = decoder.DecoderConfig.from_config(config.model)
    params = artifacts.policy_params(config, str(pipeline))
    tags = world.split_rewrite_tags("train")[:11]
    queries, rewrites = [t.query for t in tags], [t.rewrite for t in tags]
    # The RL stage's judge shapes (compiled already): two chunks of 8 pairs, the second padded.
    judge = rewrite_task.TagJudge(params, model_config, tokenizer, batch_size=config.rewrite.judge_batch_size,
                                  max_prompt_len=config.data.max_prompt_len + config.data.max_response_len)
    jax.tree_util.tree_map(lambda x: x.delete(), params)  # the judge holds its own frozen copy
    probs = judge(queries, rewrites)

    rows, spans = [], []
    for query, text in zip(queries, rewrites):
        prompt = tokenizer(cot.tag_prompt(query, text))["input_ids"]
        for tag in cot.REWRITE_TAGS:
            answer = tokenizer(tag, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(prompt + answer)
            spans.append((len(prompt), len(prompt) + len(answer)))
    width = max(len(r) for r in rows)
    tokens = np.array([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], np.int32)
    mask = np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]
    logp = np.asarray(jax.jit(decoder.token_log_probs, static_argnums=1)(
        judge.params, model_config, jnp.asarray(tokens), jnp.asarray(mask)))
    scores = np.array([logp[i, start:end].sum() for i, (start, end) in enumerate(spans)]).reshape(11, 3)
    reference = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert probs.shape == (11, 3)
    np.testing.assert_allclose(probs, reference, atol=1e-5)


def test_student_judge_grades_the_hits_with_the_distilled_student(pipeline, config, world):
    """`rewrite.judge = "student"`: the `distill` stage (gold teacher) leaves a student in the workdir; the
    judge's scores equal its expected grades of the engine's hits, recomputed in one unpadded batch, and
    they reach the fused reward."""
    config = rewrite_configs.get_config("micro")
    config.rewrite.judge = "student"
    report = distill.run(config, str(pipeline))
    assert report["heads"] == ["y", "ms", "ma"]
    assert set(report["synthetic_test"]["per_node_accuracy"]) == {"y", "ms", "ma"}
    task = rewrite_task.RewriteTask.from_workdir(config, world, str(pipeline), load_sft_params=None)
    queries = task.queries[:5]
    rewrites = [q.gold_rewrite for q in queries[:3]] + [q.text for q in queries[3:]]
    scores = task.judge([q.text for q in queries], rewrites)

    params = artifacts.student_params(config, str(pipeline))
    hits = task.engine.search_batch(rewrites, config.rewrite.k)
    pairs = [(q.text, world.product_by_id[pid].title) for q, row in zip(queries, hits) for pid, _ in row]
    encoded = encoder.encode_pairs(encoder.load_pair_tokenizer(encoder.minilm_folder()), *zip(*pairs),
                                   config.distill.max_length)
    logits = jax.jit(encoder.node_logits, static_argnums=1)(params, artifacts.student_config(), *encoded)
    grades = np.asarray(jax.nn.softmax(logits["y"])) @ [world_lib.RELEVANCE_GRADES[y] for y in cot.LABELS]
    bounds = np.cumsum([0] + [len(row) for row in hits])
    reference = [grades[a:b].sum() / (3 * config.rewrite.k) for a, b in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_allclose(scores, reference, atol=1e-5)
    assert bounds[-1] > 0 and np.all((scores >= 0) & (scores <= 1))

    offsets = [np.zeros((1, 2), np.int64)] * len(queries)
    scored = task.score(np.arange(len(queries)), rewrites, offsets)
    assert scored.metrics["rl/reward_rel"] == pytest.approx(np.mean(scores))

    # rewrite_eval scores the student judge on the policy's own rewrites against the truth; the true score
    # is the offline relevance@k / 3 of the same report.
    config.rewrite_eval.update(policies=("sft",), splits=("test",))
    report_path = pipeline / "rewrite_eval" / "metrics.json"
    kept = report_path.read_bytes()  # the pipeline's own report, which other tests read
    try:
        report = rewrite.run_eval(config, str(pipeline))["sft/test"]
    finally:
        report_path.write_bytes(kept)
    judged = report["retrieval_judge"]
    assert judged["own_true_score"] == pytest.approx(report["relevance"] / 3)
    assert 0.0 <= judged["own_score"] <= 1.0
    corr = judged["score_truth_corr"]  # NaN when either side is flat (a 2-step student on 8 queries may be)
    assert np.isnan(corr) or -1.0 <= corr <= 1.0


def test_score_judge_metrics_hand_computed(world):
    queries = world.split_queries("test")[:3]
    judge = lambda texts, rewrites: np.array([0.9, 0.5, 0.4])
    truth = lambda texts, rewrites: np.array([0.6, 0.2, 0.1])
    report = rewrite_eval.score_judge_metrics(judge, truth, queries, ["a", "b", "c"])
    assert report == pytest.approx({"own_score": 0.6, "own_true_score": 0.3, "score_truth_corr": 1.0})
    flat = rewrite_eval.score_judge_metrics(judge, lambda t, r: np.full(3, 0.5), queries, ["a", "b", "c"])
    assert np.isnan(flat["score_truth_corr"])
