"""msd_jax: single-round self-supervised distributed learning with Vision Transformers (MS-DINO).

The packages follow the data flow, and a module imports only from its own stage or earlier ones:

  trust.py       the one error of untrusted input, paths kept inside their folder, value checks
  layout.py      where each party reads and writes inside a work directory; site names as paths
  distributed.py several processes on jax.distributed: start-up, the writing process, barriers
  data/          images: Br35H and image folders, site partitions, pixel augmentations
  models/        the ViT: head (patch + position embedding), body, DINO head; bf16 matmuls
  encryption/    the site transform: head, permutation, modes, shards + manifests, verification
  msd/           masked-sampling distillation: views, DINO loss, schedules, the one jitted step
  training/      the one training loop, the MSD trainer, the classifier trainer, TensorBoard
  protocols/     token upload, model upload + one-shot merge, FedAvg, model files and their bytes;
                 the centralized and supervised baselines
  evaluation/    features, kNN, linear probe, fine-tuning, metrics, plots
  parties.py     one function per party and mode, over a work directory
  experiments/   the comparison of every protocol and baseline, the privacy audit
  config.py, main.py, export.py   the config (every default) and the command lines
"""
