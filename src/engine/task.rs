//! What the training loop needs from a model + its data: the trainer is written against this
//! trait, and `engine::tasks` adapts the heads crate's Detector / Segmentor (and a tiny test
//! model) to it.

use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Tensor};

/// A trainable model together with its training and validation data.
pub trait TrainTask {
    /// Every parameter and buffer, under its mmdet/mmseg checkpoint name.
    fn var_store(&self) -> &nn::VarStore;
    /// Batches in one pass over the training set at the configured batch size.
    fn batches_per_epoch(&self) -> u64;
    /// Images in one batch (for images/s and the lr scaling rule).
    fn images_per_batch(&self) -> usize;
    /// Position the training data so the next batch is batch `batch` of epoch `epoch` (the
    /// order of an epoch is a function of (seed, epoch) only, so resume is exact).
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()>;
    /// Take the next batch and run the model in training mode; returns the loss terms, already
    /// weighted, whose sum is minimised (names start with `loss`).
    fn forward_train(&mut self) -> Result<Vec<(String, Tensor)>>;
    /// Seconds the last `forward_train` waited for its batch (the loader's queue), part of its
    /// time: the training log's `data_time`.
    fn data_wait(&self) -> f64 {
        0.0
    }
    /// Evaluate on the validation set; `out_dir` may receive drawings / result files.
    fn evaluate(&mut self, out_dir: &Path) -> Result<BTreeMap<String, f64>>;
    /// Class names in label order (what checkpoints record for `test` / `predict`).
    fn class_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// The dataset's category id of each label (COCO-format data); empty otherwise.
    fn category_ids(&self) -> Vec<i64> {
        Vec::new()
    }
    /// Images in the training set (what the sampler draws from), when known.
    fn num_train_images(&self) -> Option<usize> {
        None
    }
    /// Training samples found unreadable (and replaced by the loader) since the last call, each
    /// reported once.
    fn take_broken(&mut self) -> Vec<cnx_datasets::loader::BrokenSample> {
        Vec::new()
    }
    /// Make this task rank `rank` of `world` data-parallel replicas: its data becomes that
    /// rank's slice of every global batch of `images_per_batch() x world` images, and
    /// `batches_per_epoch` counts global batches.
    fn set_replica(&mut self, _rank: usize, world: usize) -> Result<()> {
        if world > 1 {
            anyhow::bail!("this task cannot train data-parallel");
        }
        Ok(())
    }
    /// Evaluate data-parallel: this rank runs its share of the validation images, results are
    /// gathered, and rank 0 alone computes, writes and returns the metrics (others return none).
    fn set_eval_shard(&mut self, _shard: crate::evaluation::Shard) {}
    /// Copy a pretrained backbone into the model (called once at start, not on resume).
    fn load_pretrained(&mut self, _path: &Path) -> Result<String> {
        anyhow::bail!("this model cannot load a pretrained backbone")
    }
}
