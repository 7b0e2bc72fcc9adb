from msd_jax.eval.linear import evaluate_features, evaluate_with_config
