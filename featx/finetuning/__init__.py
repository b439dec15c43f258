"""Fine-tuning baselines: train a backbone (or part of it) end to end with a new linear head.

Strategies, compared with frozen-feature heads on the same :class:`SplitPlan` rows:

* ``full``: every weight trains; backbone parameters at ``lr * backbone_lr_scale`` (discriminative LR).
* ``partial``: only the last ``trainable_blocks`` groups of ``Backbone.blocks`` (and the head) train; frozen
  BatchNorm layers stay in eval mode so their running statistics keep the pretrained values.
* ``head``: frozen backbone in eval mode, Dropout + Linear trained on augmented images (the Keras recipe).
* ``lp-ft`` (Kumar et al., 2022): fit a logistic-regression probe on standardised frozen features (C chosen
  on val, :func:`featx.heads.fit_linear_probe`), fold the scaling into the head, then fine-tune everything at
  ``lr * lp_ft_lr_scale``. The probe-initialised network is scored on val before any update (epoch 0) and stays
  an early-stopping candidate, so LP-FT never ends below its own probe on val.

Protocol (the heads' linear-evaluation protocol, Kornblith et al. 2019, applied to fine-tuning):

* ``selection="val"``: train on train, score val (accuracy and log-loss, the mean cross-entropy) after every
  epoch, keep the best epoch: the highest val accuracy, ties broken by the lower val log-loss, then by the later
  epoch. Early stopping looks at accuracy only: an epoch with equal val accuracy counts as progress and resets the
  patience. :func:`finetune_search` does this for every point of an lr x weight-decay grid and picks the point
  whose chosen epoch has the highest val accuracy (ties: lower val log-loss, then first in grid order).
* ``final_fit="train+val"`` (default): retrain from the pretrained weights, with the same seed, on train + val
  for exactly the chosen number of epochs, on the same LR schedule (defined over ``epochs`` and stopped at the
  chosen epoch) -- no val scores are looked at -- and score test once. ``final_fit="train"`` scores the
  best-on-val model trained on train alone.
* ``selection="rule"`` (few-shot draws): no val labels at all; a fixed schedule modelled on BiT's HyperRule
  (:func:`hyper_rule`), no early stopping, test scored once.

The loop has the shape of torchvision's reference script (plain :func:`train_one_epoch` / :func:`evaluate`,
a plain checkpoint dict written each epoch, resume at ``epoch + 1``) without its AMP pitfalls: forward and
loss run under autocast, a GradScaler exists only for fp16, and each iteration makes exactly one step.

Determinism: every training run (each grid point, the final refit) starts from the pretrained weights with
torch, numpy and ``random`` seeded from ``config.seed``; the train loader's generator is re-seeded from
(seed, epoch) every epoch, and checkpoints carry the RNG states, so a resumed run repeats what the
uninterrupted one would have done on the same machine, device and ``num_workers``. Some CPU and CUDA
kernels (multi-threaded convolution backward, cuDNN algorithm choice) are not bitwise reproducible, so
runs on other machines agree closely rather than exactly.

Augmentation (training images only) is ``config.augment``: names from :data:`AUGMENT_REGISTRY` (default: all,
random resized crop 0.35-1, horizontal flip, shear/zoom), recorded with their parameters in every checkpoint and
result (``augment``); a resume with other augmentation is refused like any other config change.

What the final model is, recorded in every result: ``backbone_updated`` (its backbone's weights or BatchNorm
statistics differ from the pretrained ones: false for ``head``, and for an lp-ft run whose val selection kept
epoch 0, which is the linear probe refit, not a fine-tuned network) and ``fine_tune_epochs`` (the epochs behind
the final model in which backbone parameters took optimizer steps), both measured on what ran, not read off
the strategy name.

Progress: a tqdm bar per epoch (``progress``) and one formatted line per epoch on the ``featx.finetuning``
logger at INFO (:func:`format_epoch_line`); per-step losses and grid details at DEBUG.

The package, in dependency order:

- ``config``: :class:`FinetuneConfig`, strategies, optimizers, per-optimizer defaults, search grids, the few-shot
  rule (:func:`hyper_rule`) and the augmentation registry (no torch at import).
- ``loop``: the plain loop (:func:`train_one_epoch`, :func:`evaluate`, :func:`evaluate_log_loss`), the LR schedule,
  the epoch line, which parameters train (and BatchNorm modes), the choice of epoch and grid point.
- ``checkpoints``: the files of a run, the checkpoint dict, RNG states, the rows key and the resume checks.
- ``probe``: LP-FT's first stage over :mod:`featx.heads`' linear probe.
- ``env``: what the runs of one call share (rows, backbone, loaders, frozen features).
- ``stage``: one training run (resume or fresh start, epoch 0, epochs, a checkpoint after each).
- ``run``: :func:`finetune` / :func:`finetune_search` as resolve -> select -> final fit -> record.

``import featx.finetuning`` loads ``config`` only; the names from the other modules (which import torch) load
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from featx.finetuning.config import (
    AUGMENT_REGISTRY,
    AUGMENTATIONS,
    DEFAULT_LR,
    DEFAULT_WEIGHT_DECAY,
    NO_AUGMENT,
    OPTIMIZERS,
    RULE_LR,
    RULE_STEPS,
    RULE_WARMUP_FRACTION,
    SEARCH_GRIDS,
    SELECTIONS,
    STRATEGIES,
    FinetuneConfig,
    augment_record,
    default_search_grid,
    hyper_rule,
    train_transform,
)

# name -> the module that defines it (these modules import torch, so they load on first use)
_LAZY = {
    "train_one_epoch": "featx.finetuning.loop",
    "evaluate": "featx.finetuning.loop",
    "evaluate_log_loss": "featx.finetuning.loop",
    "warmup_cosine": "featx.finetuning.loop",
    "format_epoch_line": "featx.finetuning.loop",
    "best_grid_index": "featx.finetuning.loop",
    "CHECKPOINT_NAME": "featx.finetuning.checkpoints",
    "FINAL_CHECKPOINT_NAME": "featx.finetuning.checkpoints",
    "RESULT_NAME": "featx.finetuning.checkpoints",
    "GRID_DIR": "featx.finetuning.checkpoints",
    "RESUMABLE_FIELDS": "featx.finetuning.checkpoints",
    "fit_probe_fixed_c": "featx.finetuning.probe",
    "init_head_from_probe": "featx.finetuning.probe",
    "finetune": "featx.finetuning.run",
    "finetune_search": "featx.finetuning.run",
}

__all__ = [
    "AUGMENT_REGISTRY",
    "AUGMENTATIONS",
    "DEFAULT_LR",
    "DEFAULT_WEIGHT_DECAY",
    "NO_AUGMENT",
    "OPTIMIZERS",
    "RULE_LR",
    "RULE_STEPS",
    "RULE_WARMUP_FRACTION",
    "SEARCH_GRIDS",
    "SELECTIONS",
    "STRATEGIES",
    "FinetuneConfig",
    "augment_record",
    "default_search_grid",
    "hyper_rule",
    "train_transform",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx.finetuning' has no attribute {name!r}")
