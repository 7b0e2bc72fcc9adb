from msd_jax.evaluation.linear import evaluate_features, evaluate_with_config
