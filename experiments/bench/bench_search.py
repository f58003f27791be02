"""Build time for 20k synthetic titles and per-query latency of SearchEngine.search_batch."""
import random, statistics, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from graphgrpo_jax.search.engine import SearchEngine

rng = random.Random(0)
brands = [f"brand{i}" for i in range(300)]
nouns = ("shoes sneakers boots socks shorts jacket mug bottle cable charger case lamp fan chair desk mat "
         "backpack watch headphones speaker blender kettle pan knife towel pillow blanket tent stove").split()
adjs = ("red blue black white green grey pink large small wireless portable stainless leather cotton "
        "waterproof kids women's men's outdoor indoor ergonomic rechargeable organic vintage").split()
extras = [f"w{i}" for i in range(5000)]

def title():
    words = [rng.choice(brands)] + rng.sample(adjs, rng.randint(1, 3)) + [rng.choice(nouns)]
    return " ".join(words + rng.sample(extras, rng.randint(2, 10)))

products = [{"id": f"P{i:06d}", "title": title()} for i in range(20_000)]

def query():
    if rng.random() < 0.5:
        return " ".join(rng.sample(adjs, 2) + [rng.choice(nouns)])
    return (f"({rng.choice(adjs)} OR {rng.choice(adjs)}) AND ({rng.choice(nouns)} OR {rng.choice(nouns)})"
            f" AND NOT {rng.choice(adjs)}")

queries = [query() for _ in range(4096)]
with tempfile.TemporaryDirectory() as tmp:
    builds = []
    for rep in range(3):
        start = time.perf_counter()
        engine = SearchEngine.build(products, f"{tmp}/engine{rep}")
        builds.append(time.perf_counter() - start)
    print(f"build 20k titles: median {statistics.median(builds):.3f} s over 3 builds {[round(b, 3) for b in builds]}")
    start = time.perf_counter(); SearchEngine.open(f"{tmp}/engine0"); print(f"open: {time.perf_counter() - start:.3f} s")
    for k in (10, 100):
        engine.search_batch(queries[:256], k)  # warm up
        per_query = []
        for i in range(0, len(queries), 64):
            batch = queries[i : i + 64]
            start = time.perf_counter()
            engine.search_batch(batch, k)
            per_query.append((time.perf_counter() - start) / len(batch) * 1e3)
        print(f"k={k}: search_batch(64 distinct queries), median per-query latency {statistics.median(per_query):.3f} ms"
              f" (p90 {sorted(per_query)[int(0.9 * len(per_query))]:.3f} ms)")
        for threads in (2, 4):
            with ThreadPoolExecutor(threads) as pool:
                start = time.perf_counter()
                list(pool.map(lambda q: engine.search(q, k), queries))
                print(f"  thread pool x{threads}: {(time.perf_counter() - start) / len(queries) * 1e3:.3f} ms per query")
        start = time.perf_counter(); [engine.search(q, k) for q in queries]
        print(f"  plain loop: {(time.perf_counter() - start) / len(queries) * 1e3:.3f} ms per query")
    group = [q for q in queries[:16] for _ in range(8)]  # 16 prompts x G=8, all rewrites identical per group
    start = time.perf_counter(); engine.search_batch(group, 10)
    print(f"16 groups x 8 identical rewrites: {(time.perf_counter() - start) / len(group) * 1e3:.3f} ms per query")
