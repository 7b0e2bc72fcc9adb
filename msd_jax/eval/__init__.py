from msd_jax.eval.linear import evaluate_features
