"""graphgrpo_jax: Graph-GRPO relevance and query-rewriting RL for e-commerce search, in JAX/Flax."""

__version__ = "0.1.0"
