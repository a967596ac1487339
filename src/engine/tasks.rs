//! Adapters from the heads crate's models and the datasets crate's loaders to [`TrainTask`]:
//! [`DetTask`] (Mask R-CNN on COCO-format data, evaluated with cnx-eval's COCOeval) and
//! [`SegTask`] (UperNet on ADE-format data, evaluated with cnx-eval's mIoU). The engine's own
//! compact model config is translated into the heads' `DetectorConfig` / `SegmentorConfig`.

use super::config::{Config, ModelConfig, Task};
use super::task::TrainTask;
use anyhow::{anyhow, bail, Context, Result};
use cnx_backbone::config::BackboneConfig;
use cnx_datasets::ade::{AdeDataset, AdeTestIter, AdeTrain, SegBatch, SegTrainPipeline};
use cnx_datasets::{
    CocoDataset, CocoTrain, DetBatch, Loader, LoaderConfig, TestIter, TestPipeline, TrainPipeline,
};
use cnx_heads::segmentor::{SegmentorConfig, TestMode};
use cnx_heads::TwoStageDetector;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{nn, Device, Tensor};

/// The backbone a config builds (for checkpoint key mapping).
pub fn backbone_config(cfg: &Config) -> Result<BackboneConfig> {
    cfg.model.backbone()
}

/// Check the model part of a config builds (before any data is read).
pub fn check_model(cfg: &Config) -> Result<()> {
    cfg.model.backbone()?;
    if let ModelConfig::Upernet(s) = &cfg.model {
        s.validate().map_err(|e| anyhow!("model: {e}"))?;
    }
    Ok(())
}

/// Names and shapes of every trainable parameter of the model a config describes, in name
/// order (what the optimizer's groups are built from); the model is built on the CPU and
/// dropped, no data is read.
pub fn trainable_parameters(cfg: &Config) -> Result<Vec<(String, Vec<i64>)>> {
    let vs = nn::VarStore::new(Device::Cpu);
    match &cfg.model {
        ModelConfig::Upernet(s) => drop(
            cnx_heads::segmentor::Segmentor::new_uninit(&vs.root(), s)
                .map_err(|e| anyhow!("{e}"))?,
        ),
        _ => drop(build_detector(&vs.root(), cfg)?),
    }
    let mut v: Vec<(String, Vec<i64>)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| (n, t.size()))
        .collect();
    v.sort();
    Ok(v)
}

/// The detector a config describes: Mask R-CNN or Cascade Mask R-CNN, one type with the RoI
/// stage its architecture asks for.
pub fn build_detector(root: &nn::Path, cfg: &Config) -> Result<TwoStageDetector> {
    Ok(match &cfg.model {
        ModelConfig::MaskRcnn(d) => TwoStageDetector::new(root, d),
        ModelConfig::CascadeMaskRcnn(c) => TwoStageDetector::new(root, c),
        ModelConfig::Upernet(_) => bail!("{} is a segmentation config", cfg.name),
    })
}

/// The segmentor a config describes.
pub fn segmentor_config(cfg: &Config) -> Result<&SegmentorConfig> {
    match &cfg.model {
        ModelConfig::Upernet(s) => Ok(s),
        _ => bail!("{} is not a UperNet config", cfg.name),
    }
}

/// Check that the data the config names exists, before any work starts.
pub fn check_data(cfg: &Config) -> Result<()> {
    let root = &cfg.data.root;
    if !root.is_dir() {
        bail!(
            "data root {} does not exist (set data.root with --set data.root=PATH or in the config; \
             `cnx demo` generates synthetic data of its own)",
            root.display()
        );
    }
    let need: Vec<PathBuf> = match cfg.task {
        Task::Det => vec![
            root.join(&cfg.data.train_ann),
            root.join(&cfg.data.train_images),
            root.join(&cfg.data.val_ann),
            root.join(&cfg.data.val_images),
        ],
        Task::Seg => vec![
            root.join(&cfg.data.train_images),
            root.join(&cfg.data.train_ann),
            root.join(&cfg.data.val_images),
            root.join(&cfg.data.val_ann),
        ],
    };
    for p in need {
        if !p.exists() {
            bail!("{} not found (data.root = {})", p.display(), root.display());
        }
    }
    Ok(())
}

/// Fail before any work starts when files the datasets name are missing, naming all of them
/// (the first 20 per set, with the totals): a long run should not stop at the first one hours
/// in, nor should fixing a dataset take one rerun per missing file.
fn ensure_files_exist(sets: &[(&str, Vec<PathBuf>)]) -> Result<()> {
    let mut msgs = Vec::new();
    for (what, paths) in sets {
        let missing = cnx_datasets::check::missing_files(paths);
        if !missing.is_empty() {
            msgs.push(format!(
                "{what}: {}",
                cnx_datasets::check::missing_message(&missing, paths.len(), 20)
            ));
        }
    }
    if !msgs.is_empty() {
        bail!(
            "{}\n(`cnx data check` decodes every image and lists every problem)",
            msgs.join("\n")
        );
    }
    Ok(())
}

/// Build the task a config describes, on `device`.
pub fn build(cfg: &Config, device: Device) -> Result<Box<dyn DemoTask>> {
    check_data(cfg)?;
    Ok(match cfg.task {
        Task::Det => Box::new(DetTask::new(cfg, device)?),
        Task::Seg => Box::new(SegTask::new(cfg, device)?),
    })
}

/// A [`TrainTask`] that can also draw its predictions (for `cnx demo` and `cnx train --draw`).
pub trait DemoTask: TrainTask {
    /// Draw predictions on the first `n` validation images into `dir`; returns the files.
    fn draw_predictions(&mut self, dir: &Path, n: usize) -> Result<Vec<PathBuf>>;
    fn as_train(&mut self) -> &mut dyn TrainTask;
}

fn loader_config(cfg: &Config, device: Device) -> LoaderConfig {
    LoaderConfig {
        batch_size: cfg.data.batch_size,
        seed: cfg.runtime.seed,
        threads: super::threads::ThreadPlan::from_env(cfg, device).workers,
        prefetch: 2,
        // An unreadable training image is replaced by another of its aspect group (each one
        // named once by the trainer) unless `data.strict` asks to stop at the first.
        replace_broken: !cfg.data.strict,
        ..LoaderConfig::default()
    }
}

/// Global batches per epoch as the loader's group sampler makes them (per aspect group) at
/// `global_batch` images per step.
fn epoch_batches<S: cnx_datasets::Source>(source: &S, global_batch: usize) -> u64 {
    let g1 = (0..source.len()).filter(|&i| source.group(i) == 1).count();
    let g0 = source.len() - g1;
    (g0.div_ceil(global_batch) + g1.div_ceil(global_batch)) as u64
}

/// The error a training batch failed with, as `cnx train` reports it.
fn train_data_error(e: cnx_datasets::DatasetError) -> anyhow::Error {
    if e.is_unreadable_input() {
        anyhow!("training data: {e} (data.strict = true stops at the first unreadable image; without it the image is replaced and the run goes on)")
    } else {
        anyhow!("training data: {e}")
    }
}

/// A task's training data, one implementation for the detection and segmentation tasks: the
/// loader over its source at `batch_size` images per rank, where it stands (a `seek` to the
/// current position keeps the loader and its prefetched batches), and how long the last batch
/// was waited for.
struct TrainData<S: cnx_datasets::Source> {
    source: Arc<S>,
    cfg: LoaderConfig,
    batch_size: usize,
    /// Global batches per epoch.
    batches: u64,
    loader: Option<Loader<S>>,
    /// Position (epoch, batch) of the loader's next batch.
    next_pos: (u64, u64),
    /// Seconds the last batch was waited for.
    wait: f64,
    /// The (epoch, batch index) a batch records.
    position: fn(&S::Batch) -> (usize, usize),
}

impl<S: cnx_datasets::Source> TrainData<S> {
    fn new(
        source: Arc<S>,
        cfg: LoaderConfig,
        batch_size: usize,
        position: fn(&S::Batch) -> (usize, usize),
    ) -> Self {
        Self {
            batches: epoch_batches(&*source, batch_size),
            source,
            cfg,
            batch_size,
            loader: None,
            next_pos: (u64::MAX, 0),
            wait: 0.0,
            position,
        }
    }

    fn set_replica(&mut self, rank: usize, world: usize) {
        self.cfg.replicas = world;
        self.cfg.rank = rank;
        self.batches = epoch_batches(&*self.source, self.batch_size * world);
        self.loader = None;
    }

    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()> {
        if self.loader.is_some() && self.next_pos == (epoch, batch) {
            return Ok(());
        }
        self.loader = None;
        self.loader = Some(Loader::new(
            self.source.clone(),
            self.cfg.clone(),
            epoch as usize,
            batch as usize,
        )?);
        self.next_pos = (epoch, batch);
        Ok(())
    }

    /// The next training batch (timed: [`TrainTask::data_wait`]).
    fn next(&mut self) -> Result<S::Batch> {
        let loader = self
            .loader
            .as_mut()
            .ok_or_else(|| anyhow!("seek before forward_train"))?;
        let t = std::time::Instant::now();
        let batch = loader
            .next()
            .ok_or_else(|| anyhow!("training loader ended"))?
            .map_err(train_data_error)?;
        self.wait = t.elapsed().as_secs_f64();
        let (epoch, iter) = (self.position)(&batch);
        self.next_pos = if iter as u64 + 1 >= self.batches {
            (epoch as u64 + 1, 0)
        } else {
            (epoch as u64, iter as u64 + 1)
        };
        Ok(batch)
    }
}

/// Mask R-CNN on a COCO-format dataset.
pub struct DetTask {
    /// Class names and category ids of the training set (label order), for checkpoints.
    classes: Vec<String>,
    category_ids: Vec<i64>,
    vs: nn::VarStore,
    backbone: BackboneConfig,
    model: TwoStageDetector,
    device: Device,
    train: TrainData<CocoTrain>,
    /// Data parallel: this rank's share of the validation images.
    eval_shard: Option<crate::evaluation::Shard>,
    val: Arc<CocoDataset>,
    val_ann: PathBuf,
    test_scale: (usize, usize),
    val_max: usize,
}

impl DetTask {
    pub fn new(cfg: &Config, device: Device) -> Result<Self> {
        check_model(cfg)?;
        let root = &cfg.data.root;
        let train = Arc::new(
            CocoDataset::load(
                root.join(&cfg.data.train_ann),
                root.join(&cfg.data.train_images),
            )
            .context("training set")?,
        );
        let val_ann = root.join(&cfg.data.val_ann);
        let val = Arc::new(
            CocoDataset::load(&val_ann, root.join(&cfg.data.val_images))
                .context("validation set")?,
        );
        ensure_files_exist(&[
            (
                "training set",
                cnx_datasets::check::coco_image_paths(&train),
            ),
            (
                "validation set",
                cnx_datasets::check::coco_image_paths(&val),
            ),
        ])?;
        if train.num_classes() as i64 != cfg.model.num_classes() {
            bail!(
                "the model has {} classes (model.roi.num_classes; Cascade: \
                 model.base.roi.num_classes) but {} has {} categories",
                cfg.model.num_classes(),
                cfg.data.train_ann,
                train.num_classes()
            );
        }
        let [long, short] = cfg.data.img_scale;
        let (long, short) = (long as usize, short as usize);
        let pipeline = match cfg.data.pipeline.as_str() {
            "detr" => TrainPipeline::scaled(short as f64 / 800.0),
            "simple" => TrainPipeline {
                scales: vec![(short, long)],
                crop_pre_scales: vec![(short, long)],
                crop_range: (1 << 20, 1 << 20),
                ..TrainPipeline::default()
            },
            p => bail!("unknown data.pipeline {p:?} for detection (detr, simple)"),
        };
        let classes = train.class_names();
        let category_ids: Vec<i64> = train.categories.iter().map(|c| c.id).collect();
        let source = Arc::new(CocoTrain::new(train, pipeline));
        let vs = nn::VarStore::new(device);
        let model = build_detector(&vs.root(), cfg)?;
        Ok(Self {
            classes,
            category_ids,
            vs,
            backbone: backbone_config(cfg)?,
            model,
            device,
            train: TrainData::new(
                source,
                loader_config(cfg, device),
                cfg.data.batch_size,
                |b| (b.epoch, b.iter),
            ),
            eval_shard: None,
            val,
            val_ann,
            test_scale: (short, long),
            val_max: cfg.data.val_max_images,
        })
    }

    fn val_batches(&self) -> impl Iterator<Item = cnx_datasets::Result<DetBatch>> {
        TestIter::new(
            self.val.clone(),
            TestPipeline {
                scale: self.test_scale,
                size_divisor: 32,
            },
            2,
        )
    }
}

impl TrainTask for DetTask {
    fn data_wait(&self) -> f64 {
        self.train.wait
    }
    fn set_eval_shard(&mut self, shard: crate::evaluation::Shard) {
        self.eval_shard = Some(shard);
    }
    fn set_replica(&mut self, rank: usize, world: usize) -> Result<()> {
        self.train.set_replica(rank, world);
        Ok(())
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn category_ids(&self) -> Vec<i64> {
        self.category_ids.clone()
    }
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    fn batches_per_epoch(&self) -> u64 {
        self.train.batches
    }
    fn images_per_batch(&self) -> usize {
        self.train.batch_size
    }
    fn take_broken(&mut self) -> Vec<cnx_datasets::loader::BrokenSample> {
        self.train.cfg.broken.take_new()
    }
    fn num_train_images(&self) -> Option<usize> {
        Some(cnx_datasets::Source::len(&*self.train.source))
    }
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()> {
        self.train.seek(epoch, batch)
    }
    fn forward_train(&mut self) -> Result<Vec<(String, Tensor)>> {
        let batch = self.train.next()?;
        let losses = crate::adapters::forward_train_batch(&self.model, &batch, self.device);
        Ok(losses.0.into_iter().filter_map(loss_term).collect())
    }
    fn evaluate(&mut self, out_dir: &Path) -> Result<BTreeMap<String, f64>> {
        // Unreadable validation images are skipped and counted (as `cnx test` does); COCOeval
        // still sees their ground truth, so they count as missed.
        let opts = crate::evaluation::InferenceOpts {
            pipeline: TestPipeline {
                scale: self.test_scale,
                size_divisor: 32,
            },
            batch_size: 2,
            limit: (self.val_max > 0).then_some(self.val_max),
            device: self.device,
            progress: false,
            shard: self.eval_shard.clone(),
        };
        let r = crate::evaluation::coco_inference(&self.model, &self.val, &opts)?;
        if self.eval_shard.as_ref().is_some_and(|s| !s.is_main()) {
            return Ok(BTreeMap::new());
        }
        let types = [cnx_eval::coco::IouType::Bbox, cnx_eval::coco::IouType::Segm];
        let summaries = crate::evaluation::coco_evaluate(
            &self.val_ann,
            &r.results,
            &out_dir.join("results.json"),
            &types,
        )?;
        let mut out = BTreeMap::new();
        for (t, s) in summaries {
            let n = t.name();
            out.extend(s.metrics(n));
            std::fs::write(
                out_dir.join(format!("{n}_summary.txt")),
                s.format_pycocotools(),
            )?;
        }
        let skipped = crate::evaluation::report_skipped(&r.skipped, "validation ");
        if skipped > 0 {
            out.insert("skipped_images".into(), skipped as f64);
        }
        Ok(out)
    }
    fn load_pretrained(&mut self, path: &Path) -> Result<String> {
        let r = cnx_heads::weights::load_checkpoint_for(&mut self.vs, path, false, &self.backbone)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(format!(
            "{} tensors loaded from {}, {} model tensors not in it",
            r.loaded.len(),
            path.display(),
            r.missing.len()
        ))
    }
}

impl DemoTask for DetTask {
    fn draw_predictions(&mut self, dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let names = self.val.class_names();
        let mut files = vec![];
        let val = self.val.clone();
        for b in self.val_batches() {
            let b = b?;
            let dets =
                tch::no_grad(|| crate::adapters::predict_batch(&self.model, &b, self.device));
            for (d, m) in dets.iter().zip(&b.metas) {
                if files.len() >= n {
                    return Ok(files);
                }
                let img = cnx_datasets::image_io::read_rgb(&val.image_path(m.index))?;
                let canvas = crate::drawing::detections(&img, d, &names, 0.3);
                let p = dir.join(format!(
                    "pred_{:03}_{}.png",
                    files.len(),
                    m.file_name.trim_end_matches(".jpg")
                ));
                canvas
                    .save(&p)
                    .with_context(|| format!("writing {}", p.display()))?;
                files.push(p);
            }
        }
        Ok(files)
    }
    fn as_train(&mut self) -> &mut dyn TrainTask {
        self
    }
}

/// UperNet on an ADE-format dataset.
pub struct SegTask {
    /// Class names (label order) when the dataset or the class count tells them.
    classes: Vec<String>,
    vs: nn::VarStore,
    backbone: BackboneConfig,
    model: cnx_heads::segmentor::Segmentor,
    device: Device,
    train: TrainData<AdeTrain>,
    /// Data parallel: this rank's share of the validation images.
    eval_shard: Option<crate::evaluation::Shard>,
    val: Arc<AdeDataset>,
    test_scale: (usize, usize),
    test_mode: TestMode,
    num_classes: usize,
    val_max: usize,
}

impl SegTask {
    pub fn new(cfg: &Config, device: Device) -> Result<Self> {
        let sc = segmentor_config(cfg)?;
        let root = &cfg.data.root;
        let split = |images: &str| images.rsplit('/').next().unwrap_or(images).to_string();
        let train = Arc::new(
            AdeDataset::load(root, &split(&cfg.data.train_images)).context("training set")?,
        );
        let val = Arc::new(
            AdeDataset::load(root, &split(&cfg.data.val_images)).context("validation set")?,
        );
        ensure_files_exist(&[
            ("training set", cnx_datasets::check::ade_paths(&train)),
            ("validation set", cnx_datasets::check::ade_paths(&val)),
        ])?;
        let [long, short] = cfg.data.img_scale;
        let [ch, cw] = cfg.data.crop_size;
        let pipeline = match cfg.data.pipeline.as_str() {
            "ade" => SegTrainPipeline {
                scale: (long as usize, short as usize),
                crop: (ch as usize, cw as usize),
                ..SegTrainPipeline::default()
            },
            "simple" => SegTrainPipeline {
                scale: (long as usize, short as usize),
                ratio_range: (0.75, 1.5),
                crop: (ch as usize, cw as usize),
                photometric: false,
                ..SegTrainPipeline::default()
            },
            p => bail!("unknown data.pipeline {p:?} for segmentation (ade, simple)"),
        };
        let source = Arc::new(AdeTrain {
            ds: train.clone(),
            pipeline,
        });
        let vs = nn::VarStore::new(device);
        let model =
            cnx_heads::segmentor::Segmentor::new(&vs.root(), sc).map_err(|e| anyhow!("{e}"))?;
        let nc = cfg.model.num_classes() as usize;
        // The dataset's class table; ADE20K's names for a 150-class model without one; names
        // the table lacks are `class_<i>`.
        let table: Vec<String> = if train.class_names.is_empty() && nc == 150 {
            cnx_datasets::classes::ADE20K_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            train.class_names.clone()
        };
        let classes: Vec<String> = (0..nc)
            .map(|i| {
                table
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("class_{i}"))
            })
            .collect();
        Ok(Self {
            classes,
            vs,
            backbone: backbone_config(cfg)?,
            model,
            device,
            train: TrainData::new(
                source,
                loader_config(cfg, device),
                cfg.data.batch_size,
                |b| (b.epoch, b.iter),
            ),
            eval_shard: None,
            val,
            test_scale: (long as usize, short as usize),
            test_mode: sc.test.mode,
            num_classes: cfg.model.num_classes() as usize,
            val_max: cfg.data.val_max_images,
        })
    }

    fn predict(&self, item: &cnx_datasets::ade::SegTestItem) -> Vec<u8> {
        let s = item.shape.map(|v| v as i64);
        let x = Tensor::from_slice(&item.image)
            .view(s)
            .to_device(self.device);
        let ori = [item.label.h as i64, item.label.w as i64];
        let logits = self.model.inference_logits(&x, self.test_mode, ori);
        cnx_heads::segmentor::argmax_u8(&logits)
    }
}

impl TrainTask for SegTask {
    fn data_wait(&self) -> f64 {
        self.train.wait
    }
    fn set_eval_shard(&mut self, shard: crate::evaluation::Shard) {
        self.eval_shard = Some(shard);
    }
    fn set_replica(&mut self, rank: usize, world: usize) -> Result<()> {
        self.train.set_replica(rank, world);
        Ok(())
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    fn batches_per_epoch(&self) -> u64 {
        self.train.batches
    }
    fn images_per_batch(&self) -> usize {
        self.train.batch_size
    }
    fn take_broken(&mut self) -> Vec<cnx_datasets::loader::BrokenSample> {
        self.train.cfg.broken.take_new()
    }
    fn num_train_images(&self) -> Option<usize> {
        Some(cnx_datasets::Source::len(&*self.train.source))
    }
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()> {
        self.train.seek(epoch, batch)
    }
    fn forward_train(&mut self) -> Result<Vec<(String, Tensor)>> {
        let batch: SegBatch = self.train.next()?;
        let s = batch.shape.map(|v| v as i64);
        let x = crate::adapters::images_to_device(
            &batch.images,
            batch.shape,
            &batch.sizes,
            self.device,
        );
        // Labels travel as bytes; the segmentor widens them on the device.
        let y = crate::adapters::upload(
            Tensor::from_slice(&batch.labels).view([s[0], s[2], s[3]]),
            self.device,
        );
        let l = self.model.forward_train(&x, &y);
        // mmseg names "decode.loss_seg" / "aux.loss_seg": logged as loss_decode / loss_aux.
        Ok(l.items
            .into_iter()
            .filter(|(k, _)| k.contains("loss"))
            .map(|(k, v)| (format!("loss_{}", k.split('.').next().unwrap_or(&k)), v))
            .collect())
    }
    fn evaluate(&mut self, _out_dir: &Path) -> Result<BTreeMap<String, f64>> {
        let mut acc = cnx_eval::miou::Accumulator::new(self.num_classes, false);
        let mut skipped = Vec::new();
        let shard = self.eval_shard.clone();
        let mut items = AdeTestIter::new(self.val.clone(), self.test_scale);
        if let Some(s) = &shard {
            items.shard = Some((s.rank, s.world));
        }
        let (rank, world) = shard.as_ref().map_or((0, 1), |s| (s.rank, s.world));
        for (k, item) in items.enumerate() {
            // The dataset index of this shard's k-th item.
            let n = rank + k * world;
            if self.val_max > 0 && n >= self.val_max {
                break;
            }
            let item = match item {
                Ok(item) => item,
                Err(e) if e.is_unreadable_input() => {
                    skipped.push(cnx_datasets::loader::BrokenSample {
                        index: n,
                        file: e
                            .path()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| format!("image {n}")),
                        error: e.to_string(),
                    });
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let pred = self.predict(&item);
            acc.add(&pred, &item.label.data)?;
        }
        if let Some(s) = &shard {
            match crate::evaluation::gather_miou(s, &acc, &skipped)? {
                Some((all, broken)) => (acc, skipped) = (all, broken),
                None => return Ok(BTreeMap::new()),
            }
        }
        let skipped = crate::evaluation::report_skipped(&skipped, "validation ");
        let names: Vec<String> = if self.val.class_names.len() == self.num_classes {
            self.val.class_names.clone()
        } else {
            (0..self.num_classes).map(|i| i.to_string()).collect()
        };
        let s = acc.summary(&names);
        std::fs::write(_out_dir.join("miou.txt"), s.format_table())?;
        let mut out = s.metrics();
        if skipped > 0 {
            out.insert("skipped_images".into(), skipped as f64);
        }
        Ok(out)
    }
    fn load_pretrained(&mut self, path: &Path) -> Result<String> {
        let r = cnx_heads::weights::load_checkpoint_for(&mut self.vs, path, false, &self.backbone)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(format!(
            "{} tensors loaded from {}, {} model tensors not in it",
            r.loaded.len(),
            path.display(),
            r.missing.len()
        ))
    }
}

impl DemoTask for SegTask {
    fn draw_predictions(&mut self, dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let mut files = vec![];
        for item in AdeTestIter::new(self.val.clone(), self.test_scale).take(n) {
            let item = item?;
            let pred = tch::no_grad(|| self.predict(&item));
            let img = cnx_datasets::image_io::read_rgb(&self.val.items[item.meta.index].0)?;
            // Image | prediction overlay | ground-truth overlay, side by side.
            let out = crate::drawing::segmentation_panels(&img, &pred, &item.label.data);
            let p = dir.join(format!(
                "pred_{:03}_{}.png",
                files.len(),
                item.meta.file_name.trim_end_matches(".jpg")
            ));
            out.save(&p)
                .with_context(|| format!("writing {}", p.display()))?;
            files.push(p);
        }
        Ok(files)
    }
    fn as_train(&mut self) -> &mut dyn TrainTask {
        self
    }
}

/// Keep only the loss terms of a detector's output (not `acc`), naming Cascade's per-stage terms
/// (`s0.loss_cls`) `loss_cls_s0` so the trainer's `loss*` logging and summing sees every stage.
fn loss_term((name, t): (String, Tensor)) -> Option<(String, Tensor)> {
    match name.split_once('.') {
        Some((stage, term)) if term.starts_with("loss") => Some((format!("{term}_{stage}"), t)),
        None if name.starts_with("loss") => Some((name, t)),
        _ => None,
    }
}

#[cfg(test)]
mod loss_term_tests {
    use super::*;

    #[test]
    fn cascade_stage_losses_are_kept_and_acc_dropped() {
        let t = || Tensor::from(1.0f32);
        let names: Vec<String> = ["loss_rpn_cls", "acc", "s1.loss_bbox", "s2.acc"]
            .into_iter()
            .filter_map(|n| loss_term((n.to_string(), t())))
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["loss_rpn_cls", "loss_bbox_s1"]);
    }

    #[test]
    fn preset_models_keep_each_architectures_rpn_loss_and_backbone() {
        use crate::engine::presets::{find, model};
        let ModelConfig::CascadeMaskRcnn(c) = model("cascade_mask_rcnn_convnext_tiny_3x").unwrap()
        else {
            panic!("a cascade preset")
        };
        assert!((c.base.rpn.smooth_l1_beta - 1.0 / 9.0).abs() < 1e-12);
        assert_eq!(c.base.rpn.allowed_border, 0.0);
        let ModelConfig::MaskRcnn(m) = model("mask_rcnn_convnext_tiny_3x").unwrap() else {
            panic!("a Mask R-CNN preset")
        };
        assert_eq!(m.rpn.smooth_l1_beta, 0.0);
        assert_eq!(m.rpn.allowed_border, -1.0);
        let ModelConfig::CascadeMaskRcnn(c) = model("cascade_mask_rcnn_r50_3x").unwrap() else {
            panic!("a cascade preset")
        };
        assert_eq!(c.base.backbone.name.as_deref(), Some("resnet50"));
        let cfg = find("upernet_swin_base_640_160k_in22k").unwrap().config();
        let s = segmentor_config(&cfg).unwrap();
        assert_eq!(s.backbone.name.as_deref(), Some("swin_base"));
        assert_eq!(s.backbone.dims, [128, 256, 512, 1024]);
        let mut bad = find("mask_rcnn_swin_tiny_3x").unwrap().config();
        if let ModelConfig::MaskRcnn(d) = &mut bad.model {
            d.backbone.name = Some("vgg16".into());
        }
        let e = check_model(&bad).unwrap_err().to_string();
        assert!(e.contains("vgg16"), "{e}");
        assert!(bad.validate().is_err());
    }
}
