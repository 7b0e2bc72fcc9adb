"""The comparison of every protocol and baseline at one compute budget (configs/compare.py).

  python -m msd_jax.main --config configs/compare.py --workdir DIR [--config.quick=True]

For each seed k (config.seed + k changes the partition, the head and every key) and each row it runs
the protocol in DIR/runs/<row>/seed<k>/ through the project's parties (run_encrypt, run_sites,
run_server), FedAvg (protocols/fedavg.py) or the baselines, evaluates the backbone with the same code
for every row (kNN + linear probe on frozen features, full fine-tuning with a linear head), and
writes DIR/runs/<row>/seed<k>/result.json atomically; a killed run skips the row-seeds whose result
exists. Then DIR/comparison.json, .md and .png.

  settings.py   the rows, the checks of config.compare, the configs derived from the user's one
  needs.py      what each row needs from the data, checked before any row trains: a stand-in
                setting (model upload without a proxy set merges on the uploaded tokens) or a skip
  budget.py     one budget of student image-views split into each row's steps per party
  rows.py       each row's training through the parties, given its steps; its result.json
  evaluate.py   the evaluation every row's backbones get
  results.py    where the row-seed results live, written atomically
  report.py     aggregation over seeds, the markdown table, the figure, the JSON outputs
  command.py    run_compare and run_sweep: the entry points

This file imports nothing, so configs/compare.py can read settings.ROWS without importing jax.
"""
