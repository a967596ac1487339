//! The paper's training recipes as named presets (one per ConvNeXt row of its COCO and ADE20K
//! tables, see shared/spec/recipes.md), plus the small demo presets `make demo` trains on CPU.

use super::config::*;
use std::borrow::Cow;
use std::path::PathBuf;

/// What the paper reports for a preset's row.
#[derive(Debug, Clone, Copy)]
pub enum PaperNumbers {
    /// COCO val2017: box AP, mask AP, params (M), FLOPs (G at 1280x800).
    Coco {
        box_ap: f64,
        mask_ap: f64,
        params_m: f64,
        flops_g: f64,
    },
    /// ADE20K val: mIoU single-scale and multi-scale+flip, params (M), FLOPs (G).
    Ade {
        miou_ss: f64,
        miou_ms: f64,
        params_m: f64,
        flops_g: f64,
    },
    /// Demo presets: no paper row.
    None,
}

/// How a preset's config is made.
#[derive(Debug, Clone, Copy)]
enum Recipe {
    Fn(fn() -> Config),
    /// A backbone-transfer row of the paper's Tables 3/4 (Swin, ResNet, ResNeXt backbones).
    Comparison(&'static str),
}

/// One named recipe.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub description: Cow<'static, str>,
    pub paper: PaperNumbers,
    build: Recipe,
}

impl Preset {
    pub fn config(&self) -> Config {
        match self.build {
            Recipe::Fn(f) => f(),
            Recipe::Comparison(name) => comparison(name),
        }
    }
}

/// The paper's second figure for each comparison row: mask AP (COCO) or single-scale mIoU
/// (ADE20K; the Swin paper's own figure), from paper-targets.md.
const COMPARISON_SECOND: [(&str, f64); 14] = [
    ("mask_rcnn_swin_tiny_3x", 41.6),
    ("cascade_mask_rcnn_r50_3x", 40.1),
    ("cascade_mask_rcnn_x101_32x4d_3x", 41.6),
    ("cascade_mask_rcnn_x101_64x4d_3x", 41.7),
    ("cascade_mask_rcnn_swin_tiny_3x", 43.7),
    ("cascade_mask_rcnn_swin_small_3x", 45.0),
    ("cascade_mask_rcnn_swin_base_3x", 45.0),
    ("cascade_mask_rcnn_swin_base_3x_in22k", 45.8),
    ("cascade_mask_rcnn_swin_large_3x_in22k", 46.7),
    ("upernet_swin_tiny_512_160k", 44.5),
    ("upernet_swin_small_512_160k", 47.6),
    ("upernet_swin_base_512_160k", 48.1),
    ("upernet_swin_base_640_160k_in22k", 50.0),
    ("upernet_swin_large_640_160k_in22k", 52.1),
];

/// The comparison rows as presets, after the ConvNeXt ones.
fn comparison_presets() -> Vec<Preset> {
    cnx_backbone::config::comparison_presets()
        .into_iter()
        .map(|p| {
            let second = COMPARISON_SECOND
                .iter()
                .find(|r| r.0 == p.name)
                .map_or(f64::NAN, |r| r.1);
            let params_m = p.paper_params_m.unwrap_or(f64::NAN);
            let (paper, what) = if p.arch == "upernet" {
                (
                    PaperNumbers::Ade {
                        miou_ss: second,
                        miou_ms: p.paper_metric,
                        params_m,
                        flops_g: p.paper_gflops,
                    },
                    "UperNet",
                )
            } else {
                (
                    PaperNumbers::Coco {
                        box_ap: p.paper_metric,
                        mask_ap: second,
                        params_m,
                        flops_g: p.paper_gflops,
                    },
                    if p.arch == "mask_rcnn" {
                        "Mask R-CNN"
                    } else {
                        "Cascade Mask R-CNN"
                    },
                )
            };
            let data = if p.arch == "upernet" {
                format!("ADE20K {0}x{0} 160k", p.crop)
            } else {
                "COCO 3x".to_string()
            };
            let desc = format!(
                "{what}, {} ({}), {data} (comparison row)",
                p.backbone_name,
                if p.in22k { "IN-22K" } else { "IN-1K" }
            );
            Preset {
                name: p.name,
                description: Cow::Owned(desc),
                paper,
                build: Recipe::Comparison(p.name),
            }
        })
        .collect()
}

/// A comparison row's config: the ConvNeXt-T recipe of the same architecture with the row's
/// backbone and the Swin repo's optimizer (AdamW, no layer-wise decay; mmcv's
/// `DefaultOptimizerConstructor` with `custom_keys` `absolute_pos_embed`,
/// `relative_position_bias_table` and `norm` at `decay_mult = 0`: every other parameter, biases
/// and other 1-D ones included, is decayed).
fn comparison(name: &str) -> Config {
    let p = cnx_backbone::config::comparison_preset(name).expect("a comparison row");
    let mut c = match p.arch {
        "upernet" => seg("tiny", p.crop as u32, p.lr, p.drop_path),
        "mask_rcnn" => det(Arch::MaskRcnn, "tiny", false, p.lr, 1.0, p.drop_path),
        _ => det(Arch::CascadeMaskRcnn, "tiny", false, p.lr, 1.0, p.drop_path),
    };
    c.name = name.to_string();
    c.model.set_name(name);
    match &mut c.model {
        ModelConfig::Upernet(s) => {
            s.backbone = cnx_heads::segmentor::BackboneSpec::from_name(p.backbone_name, p.drop_path)
                .expect("a comparison backbone")
        }
        ModelConfig::MaskRcnn(d) => {
            d.backbone = cnx_heads::detector::BackboneCfg::named(p.backbone_name, p.drop_path)
                .expect("a comparison backbone")
        }
        ModelConfig::CascadeMaskRcnn(k) => {
            k.base.backbone = cnx_heads::detector::BackboneCfg::named(p.backbone_name, p.drop_path)
                .expect("a comparison backbone")
        }
    }
    c.optimizer.weight_decay = p.weight_decay;
    c.optimizer.decay_type = DecayType::None;
    c.optimizer.decay_rate = 1.0;
    c.optimizer.no_decay_keys = vec![
        "absolute_pos_embed".into(),
        "relative_position_bias_table".into(),
        "norm".into(),
    ];
    c.optimizer.no_decay_1d_and_bias = false;
    c
}

/// Every preset, paper rows first, then the demos.
pub fn all() -> Vec<Preset> {
    use PaperNumbers::*;
    vec![
        Preset {
            name: "mask_rcnn_convnext_tiny_3x",
            description: Cow::Borrowed("Mask R-CNN, ConvNeXt-T (IN-1K), COCO 3x"),
            paper: Coco {
                box_ap: 46.2,
                mask_ap: 41.7,
                params_m: 48.0,
                flops_g: 262.0,
            },
            build: Recipe::Fn(|| det(Arch::MaskRcnn, "tiny", false, 1e-4, 0.95, 0.4)),
        },
        Preset {
            name: "cascade_mask_rcnn_convnext_tiny_3x",
            description: Cow::Borrowed("Cascade Mask R-CNN, ConvNeXt-T (IN-1K), COCO 3x"),
            paper: Coco {
                box_ap: 50.4,
                mask_ap: 43.7,
                params_m: 86.0,
                flops_g: 741.0,
            },
            build: Recipe::Fn(|| det(Arch::CascadeMaskRcnn, "tiny", false, 2e-4, 0.7, 0.4)),
        },
        Preset {
            name: "cascade_mask_rcnn_convnext_small_3x",
            description: Cow::Borrowed("Cascade Mask R-CNN, ConvNeXt-S (IN-1K), COCO 3x"),
            paper: Coco {
                box_ap: 51.9,
                mask_ap: 45.0,
                params_m: 108.0,
                flops_g: 827.0,
            },
            build: Recipe::Fn(|| det(Arch::CascadeMaskRcnn, "small", false, 2e-4, 0.7, 0.6)),
        },
        Preset {
            name: "cascade_mask_rcnn_convnext_base_3x",
            description: Cow::Borrowed("Cascade Mask R-CNN, ConvNeXt-B (IN-1K), COCO 3x"),
            paper: Coco {
                box_ap: 52.7,
                mask_ap: 45.6,
                params_m: 146.0,
                flops_g: 964.0,
            },
            build: Recipe::Fn(|| det(Arch::CascadeMaskRcnn, "base", false, 2e-4, 0.8, 0.7)),
        },
        Preset {
            name: "cascade_mask_rcnn_convnext_base_3x_in22k",
            description: Cow::Borrowed("Cascade Mask R-CNN, ConvNeXt-B (IN-22K), COCO 3x"),
            paper: Coco {
                box_ap: 54.0,
                mask_ap: 46.9,
                params_m: 146.0,
                flops_g: 964.0,
            },
            build: Recipe::Fn(|| det(Arch::CascadeMaskRcnn, "base", true, 1e-4, 0.8, 0.6)),
        },
        Preset {
            name: "cascade_mask_rcnn_convnext_large_3x_in22k",
            description: Cow::Borrowed("Cascade Mask R-CNN, ConvNeXt-L (IN-22K), COCO 3x"),
            paper: Coco {
                box_ap: 54.8,
                mask_ap: 47.6,
                params_m: 255.0,
                flops_g: 1354.0,
            },
            build: Recipe::Fn(|| det(Arch::CascadeMaskRcnn, "large", true, 1e-4, 0.7, 0.7)),
        },
        Preset {
            name: "cascade_mask_rcnn_convnext_xlarge_3x_in22k",
            description: Cow::Borrowed("Cascade Mask R-CNN, ConvNeXt-XL (IN-22K), COCO 3x"),
            paper: Coco {
                box_ap: 55.2,
                mask_ap: 47.7,
                params_m: 407.0,
                flops_g: 1898.0,
            },
            build: Recipe::Fn(|| det(Arch::CascadeMaskRcnn, "xlarge", true, 1e-4, 0.7, 0.8)),
        },
        Preset {
            name: "upernet_convnext_tiny_512_160k",
            description: Cow::Borrowed("UperNet, ConvNeXt-T (IN-1K), ADE20K 512x512 160k"),
            paper: Ade {
                miou_ss: 46.0,
                miou_ms: 46.7,
                params_m: 60.0,
                flops_g: 939.0,
            },
            build: Recipe::Fn(|| seg("tiny", 512, 1e-4, 0.4)),
        },
        Preset {
            name: "upernet_convnext_small_512_160k",
            description: Cow::Borrowed("UperNet, ConvNeXt-S (IN-1K), ADE20K 512x512 160k"),
            paper: Ade {
                miou_ss: 48.7,
                miou_ms: 49.6,
                params_m: 82.0,
                flops_g: 1027.0,
            },
            build: Recipe::Fn(|| seg("small", 512, 1e-4, 0.3)),
        },
        Preset {
            name: "upernet_convnext_base_512_160k",
            description: Cow::Borrowed("UperNet, ConvNeXt-B (IN-1K), ADE20K 512x512 160k"),
            paper: Ade {
                miou_ss: 49.1,
                miou_ms: 49.9,
                params_m: 122.0,
                flops_g: 1170.0,
            },
            build: Recipe::Fn(|| seg("base", 512, 1e-4, 0.4)),
        },
        Preset {
            name: "upernet_convnext_base_640_160k_in22k",
            description: Cow::Borrowed("UperNet, ConvNeXt-B (IN-22K), ADE20K 640x640 160k"),
            paper: Ade {
                miou_ss: 52.6,
                miou_ms: 53.1,
                params_m: 122.0,
                flops_g: 1828.0,
            },
            build: Recipe::Fn(|| seg("base", 640, 1e-4, 0.4)),
        },
        Preset {
            name: "upernet_convnext_large_640_160k_in22k",
            description: Cow::Borrowed("UperNet, ConvNeXt-L (IN-22K), ADE20K 640x640 160k"),
            paper: Ade {
                miou_ss: 53.2,
                miou_ms: 53.7,
                params_m: 235.0,
                flops_g: 2458.0,
            },
            build: Recipe::Fn(|| seg("large", 640, 1e-4, 0.4)),
        },
        Preset {
            name: "upernet_convnext_xlarge_640_160k_in22k",
            description: Cow::Borrowed("UperNet, ConvNeXt-XL (IN-22K), ADE20K 640x640 160k"),
            paper: Ade {
                miou_ss: 53.6,
                miou_ms: 54.0,
                params_m: 391.0,
                flops_g: 3335.0,
            },
            build: Recipe::Fn(|| seg("xlarge", 640, 8e-5, 0.4)),
        },
        Preset {
            name: "demo_mask_rcnn_convnext_nano",
            description: Cow::Borrowed(
                "demo: tiny ConvNeXt Mask R-CNN on synthetic COCO-format shapes (CPU)",
            ),
            paper: None,
            build: Recipe::Fn(demo_det),
        },
        Preset {
            name: "demo_cascade_mask_rcnn_convnext_nano",
            description: Cow::Borrowed(
                "demo: tiny ConvNeXt Cascade Mask R-CNN on synthetic COCO-format shapes (CPU)",
            ),
            paper: None,
            build: Recipe::Fn(demo_cascade),
        },
        Preset {
            name: "demo_upernet_convnext_nano",
            description: Cow::Borrowed(
                "demo: tiny ConvNeXt UperNet on synthetic ADE-format scenes (CPU)",
            ),
            paper: None,
            build: Recipe::Fn(demo_seg),
        },
    ]
    .into_iter()
    .chain(comparison_presets())
    .collect()
}

/// Look a preset up by name; the error lists the valid names.
pub fn find(name: &str) -> anyhow::Result<Preset> {
    all().into_iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = all().iter().map(|p| p.name).collect();
        anyhow::anyhow!(
            "unknown preset {name:?}; known presets:\n  {}",
            names.join("\n  ")
        )
    })
}

/// The model a preset describes (the one registry every command builds presets from).
pub fn model(name: &str) -> anyhow::Result<ModelConfig> {
    Ok(find(name)?.config().model)
}

/// A UperNet preset's segmentor.
pub fn segmentor(name: &str) -> anyhow::Result<SegmentorConfig> {
    match model(name)? {
        ModelConfig::Upernet(s) => Ok(s),
        _ => anyhow::bail!("{name} is not a UperNet preset"),
    }
}

/// Depths and widths of the ConvNeXt variants (paper Table / models.md).
pub fn convnext_arch(size: &str) -> (Vec<i64>, Vec<i64>) {
    match size {
        "tiny" => (vec![3, 3, 9, 3], vec![96, 192, 384, 768]),
        "small" => (vec![3, 3, 27, 3], vec![96, 192, 384, 768]),
        "base" => (vec![3, 3, 27, 3], vec![128, 256, 512, 1024]),
        "large" => (vec![3, 3, 27, 3], vec![192, 384, 768, 1536]),
        "xlarge" => (vec![3, 3, 27, 3], vec![256, 512, 1024, 2048]),
        other => panic!("no ConvNeXt size {other}"),
    }
}

fn coco_data() -> DataConfig {
    DataConfig {
        format: "coco".into(),
        root: PathBuf::from("data/coco"),
        train_ann: "annotations/instances_train2017.json".into(),
        train_images: "train2017".into(),
        val_ann: "annotations/instances_val2017.json".into(),
        val_images: "val2017".into(),
        pipeline: "detr".into(),
        img_scale: [1333, 800],
        crop_size: [0, 0],
        batch_size: 16,
        workers: 4,
        val_max_images: 0,
        strict: false,
    }
}

/// mmcv's `num_layers` of the layer-decay constructors in the official configs: 6 for T
/// (`stages.2` has 9 blocks), 12 for the 27-block S, B, L and XL.
fn decay_num_layers(size: &str) -> i64 {
    if size == "tiny" {
        6
    } else {
        12
    }
}

/// Training precision of the official configs: fp32 for L and XL (`fp16` off), fp16 otherwise.
fn recipe_amp(size: &str) -> Amp {
    if matches!(size, "large" | "xlarge") {
        Amp::None
    } else {
        Amp::Fp16
    }
}

fn det(arch: Arch, size: &str, in22k: bool, lr: f64, decay_rate: f64, drop_path: f64) -> Config {
    let cascade = arch == Arch::CascadeMaskRcnn;
    let prefix = if cascade {
        "cascade_mask_rcnn"
    } else {
        "mask_rcnn"
    };
    let name = format!(
        "{prefix}_convnext_{size}_3x{}",
        if in22k { "_in22k" } else { "" }
    );
    // The paper's model (mmdet's configs): 80 classes, the recipe's drop path.
    let mut model = if cascade {
        let mut c = CascadeConfig::cascade_mask_rcnn_convnext(size).expect("a ConvNeXt size");
        c.base.backbone.drop_path_rate = drop_path;
        ModelConfig::CascadeMaskRcnn(c)
    } else {
        let mut d = DetectorConfig::mask_rcnn_convnext(size).expect("a ConvNeXt size");
        d.backbone.drop_path_rate = drop_path;
        ModelConfig::MaskRcnn(d)
    };
    model.set_name(&name);
    Config {
        name,
        task: Task::Det,
        model,
        data: coco_data(),
        optimizer: OptimizerConfig {
            lr,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.05,
            decay_type: DecayType::LayerWise,
            decay_rate,
            num_layers: decay_num_layers(size),
            base_batch_size: 16,
            scale_lr: true,
            no_decay_keys: vec![],
            no_decay_1d_and_bias: true,
        },
        schedule: ScheduleConfig {
            policy: Policy::Step,
            warmup_iters: 500,
            warmup_ratio: 0.001,
            step_epochs: vec![27, 33],
            gamma: 0.1,
            power: 1.0,
            min_lr: 0.0,
        },
        runtime: RuntimeConfig {
            max_epochs: 36,
            max_iters: 0,
            // COCO train2017 at batch 16 is ~7330 iterations per epoch.
            checkpoint_interval: 7330,
            eval_interval: 7330 * 3,
            log_interval: 50,
            amp: recipe_amp(size),
            grad_accum: 1,
            clip_grad_norm: 0.0,
            seed: 0,
            device: "auto".into(),
            work_dir: String::new(),
            threads: 0,
            keep_checkpoints: 3,
        },
    }
}

fn seg(size: &str, crop: u32, lr: f64, drop_path: f64) -> Config {
    let (scale, stride) = if crop == 640 {
        ([2560, 640], 426)
    } else {
        ([2048, 512], 341)
    };
    let name = format!(
        "upernet_convnext_{size}_{crop}_160k{}",
        if crop == 640 { "_in22k" } else { "" }
    );
    // mmseg's UperNet config: 150 classes, slide inference at the crop size.
    let mut m = SegmentorConfig::upernet_convnext(size).expect("a ConvNeXt size");
    if crop == 640 {
        m = m.crop_640();
    }
    m.backbone.drop_path_rate = drop_path;
    m.name = name.clone();
    debug_assert_eq!(m.test.stride, [stride, stride]);
    Config {
        name,
        task: Task::Seg,
        model: ModelConfig::Upernet(m),
        data: DataConfig {
            format: "ade".into(),
            root: PathBuf::from("data/ade/ADEChallengeData2016"),
            train_ann: "annotations/training".into(),
            train_images: "images/training".into(),
            val_ann: "annotations/validation".into(),
            val_images: "images/validation".into(),
            pipeline: "ade".into(),
            img_scale: scale,
            crop_size: [crop, crop],
            batch_size: 16,
            workers: 4,
            val_max_images: 0,
            strict: false,
        },
        optimizer: OptimizerConfig {
            lr,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.05,
            decay_type: DecayType::StageWise,
            decay_rate: 0.9,
            num_layers: decay_num_layers(size),
            base_batch_size: 16,
            scale_lr: true,
            no_decay_keys: vec![],
            no_decay_1d_and_bias: true,
        },
        schedule: ScheduleConfig {
            policy: Policy::Poly,
            warmup_iters: 1500,
            warmup_ratio: 1e-6,
            step_epochs: vec![],
            gamma: 0.1,
            power: 1.0,
            min_lr: 0.0,
        },
        runtime: RuntimeConfig {
            max_epochs: 0,
            max_iters: 160_000,
            checkpoint_interval: 16_000,
            eval_interval: 16_000,
            log_interval: 50,
            amp: recipe_amp(size),
            grad_accum: 1,
            clip_grad_norm: 0.0,
            seed: 0,
            device: "auto".into(),
            work_dir: String::new(),
            threads: 0,
            keep_checkpoints: 3,
        },
    }
}

/// Demo detector: a "nano" ConvNeXt (depths 1,1,2,1, dims 16..128) with a 64-channel FPN at
/// ~256 px, trained from scratch on CPU. Tuned so `make demo` shows learning in minutes.
fn demo_det() -> Config {
    let mut c = det(Arch::MaskRcnn, "tiny", false, 1e-4, 0.95, 0.0);
    c.name = "demo_mask_rcnn_convnext_nano".into();
    let ModelConfig::MaskRcnn(d) = &mut c.model else {
        unreachable!("det() of Mask R-CNN")
    };
    demo_nano_detector(d);
    c.data = DataConfig {
        format: "coco".into(),
        root: PathBuf::from("work_dirs/demo_det/data"),
        train_ann: "annotations/instances_train.json".into(),
        train_images: "train".into(),
        val_ann: "annotations/instances_val.json".into(),
        val_images: "val".into(),
        pipeline: "simple".into(),
        img_scale: [256, 256],
        crop_size: [0, 0],
        batch_size: 4,
        workers: 2,
        val_max_images: 0,
        strict: false,
    };
    c.optimizer.lr = 2e-3;
    c.optimizer.base_batch_size = 4;
    c.optimizer.decay_rate = 1.0;
    c.schedule = ScheduleConfig {
        policy: Policy::Step,
        warmup_iters: 50,
        warmup_ratio: 0.001,
        step_epochs: vec![11, 13],
        gamma: 0.1,
        power: 1.0,
        min_lr: 0.0,
    };
    // 240 training images / batch 4 = 60 iterations per epoch.
    c.runtime.max_epochs = 14;
    c.runtime.checkpoint_interval = 300;
    c.runtime.eval_interval = 150;
    c.runtime.log_interval = 20;
    c.runtime.amp = Amp::None;
    c.runtime.device = "cpu".into();
    // One libtorch thread: these tensors are small, and OpenMP's spin-waiting on a busy 2-core
    // machine cost 3-4x in measurements; the data loader uses the other core.
    c.runtime.threads = 1;
    c.runtime.keep_checkpoints = 2;
    c
}

/// The demo's nano ConvNeXt (depths 1,1,2,1, dims 16..128) with a 64-channel FPN and small
/// RPN / RoI budgets, six classes (cnx_datasets::synth::coco draws six shape classes).
fn demo_nano_detector(d: &mut DetectorConfig) {
    d.name = "demo_mask_rcnn_convnext_nano".into();
    d.backbone.depths = vec![1, 1, 2, 1];
    d.backbone.dims = vec![16, 32, 64, 128];
    d.backbone.drop_path_rate = 0.0;
    d.neck.out_channels = 64;
    d.rpn.train_proposals.nms_pre = 500;
    d.rpn.train_proposals.max_per_img = 200;
    d.rpn.test_proposals.nms_pre = 300;
    d.rpn.test_proposals.max_per_img = 100;
    d.roi.num_classes = 6;
    d.roi.sampler.num = 128;
    d.roi.fc_dim = 256;
    d.roi.mask_num_convs = 2;
    d.roi.mask_conv_channels = 64;
    d.roi.test.max_per_img = 50;
}

/// Demo Cascade Mask R-CNN: the demo detector's nano network with Cascade's three stages
/// (4conv1fc box heads with SyncBN at 64 channels) on the same data and schedule.
fn demo_cascade() -> Config {
    let mut c = demo_det();
    c.name = "demo_cascade_mask_rcnn_convnext_nano".into();
    let mut k = CascadeConfig::cascade_mask_rcnn_convnext("tiny").expect("tiny");
    demo_nano_detector(&mut k.base);
    k.base.rpn.train_proposals.max_per_img = 200;
    k.base.name = c.name.clone();
    for s in k.stages.iter_mut() {
        s.sampler.num = 128;
    }
    k.conv_channels = 64;
    c.model = ModelConfig::CascadeMaskRcnn(k);
    c
}

/// Demo segmentor: nano ConvNeXt + 64-channel UperNet on 128 px synthetic scenes.
fn demo_seg() -> Config {
    let mut c = seg("tiny", 512, 1e-4, 0.0);
    c.name = "demo_upernet_convnext_nano".into();
    let ModelConfig::Upernet(m) = &mut c.model else {
        unreachable!("seg() is UperNet")
    };
    m.name = c.name.clone();
    m.backbone.depths = vec![1, 1, 2, 1];
    m.backbone.dims = vec![16, 32, 64, 128];
    m.backbone.drop_path_rate = 0.0;
    // cnx_datasets::synth::ade: sky, floor and six shapes (label 0 "other" is ignored).
    m.num_classes = 8;
    m.decode_head.channels = 64;
    if let Some(a) = m.auxiliary_head.as_mut() {
        a.channels = 32;
    }
    m.test.mode = cnx_heads::segmentor::TestMode::Whole;
    m.test.crop_size = [128, 128];
    m.test.stride = [96, 96];
    m.test.img_scale = [128, 128];
    c.data = DataConfig {
        format: "ade".into(),
        root: PathBuf::from("work_dirs/demo_seg/data"),
        train_ann: "annotations/training".into(),
        train_images: "images/training".into(),
        val_ann: "annotations/validation".into(),
        val_images: "images/validation".into(),
        pipeline: "simple".into(),
        img_scale: [128, 128],
        crop_size: [128, 128],
        batch_size: 8,
        workers: 2,
        val_max_images: 0,
        strict: false,
    };
    c.optimizer.lr = 2e-3;
    c.optimizer.base_batch_size = 8;
    c.optimizer.decay_rate = 1.0;
    c.schedule.warmup_iters = 50;
    c.schedule.warmup_ratio = 1e-3;
    c.runtime.max_iters = 600;
    c.runtime.checkpoint_interval = 300;
    c.runtime.eval_interval = 150;
    c.runtime.log_interval = 20;
    c.runtime.amp = Amp::None;
    c.runtime.device = "cpu".into();
    c.runtime.threads = 1;
    c.runtime.keep_checkpoints = 2;
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_their_config_and_recipe_table() {
        let ps = all();
        assert_eq!(ps.len(), 30);
        for p in &ps {
            assert_eq!(p.config().name, p.name);
        }
        // recipes.md table: (lr, decay_rate, drop_path).
        let table = [
            ("mask_rcnn_convnext_tiny_3x", 1e-4, 0.95, 0.4),
            ("cascade_mask_rcnn_convnext_tiny_3x", 2e-4, 0.7, 0.4),
            ("cascade_mask_rcnn_convnext_small_3x", 2e-4, 0.7, 0.6),
            ("cascade_mask_rcnn_convnext_base_3x", 2e-4, 0.8, 0.7),
            ("cascade_mask_rcnn_convnext_base_3x_in22k", 1e-4, 0.8, 0.6),
            ("cascade_mask_rcnn_convnext_large_3x_in22k", 1e-4, 0.7, 0.7),
            ("cascade_mask_rcnn_convnext_xlarge_3x_in22k", 1e-4, 0.7, 0.8),
            ("upernet_convnext_tiny_512_160k", 1e-4, 0.9, 0.4),
            ("upernet_convnext_small_512_160k", 1e-4, 0.9, 0.3),
            ("upernet_convnext_base_512_160k", 1e-4, 0.9, 0.4),
            ("upernet_convnext_base_640_160k_in22k", 1e-4, 0.9, 0.4),
            ("upernet_convnext_large_640_160k_in22k", 1e-4, 0.9, 0.4),
            ("upernet_convnext_xlarge_640_160k_in22k", 8e-5, 0.9, 0.4),
        ];
        for (name, lr, rate, dp) in table {
            let c = find(name).unwrap().config();
            assert_eq!(c.optimizer.lr, lr, "{name}");
            assert_eq!(c.optimizer.decay_rate, rate, "{name}");
            assert_eq!(c.model.drop_path_rate(), dp, "{name}");
            assert_eq!(c.optimizer.weight_decay, 0.05);
            assert_eq!(c.data.batch_size, 16);
        }
        let s = find("upernet_convnext_large_640_160k_in22k")
            .unwrap()
            .config();
        assert_eq!(s.data.crop_size, [640, 640]);
        assert_eq!(s.data.img_scale, [2560, 640]);
        assert!(find("mask_rcnn_convnext_huge").is_err());
    }

    /// The official L/XL configs train in fp32, T/S/B in fp16; `config show` prints it; layer
    /// decay spans 12 layers for the 27-block variants and 6 for T.
    #[test]
    fn precision_and_decay_depth_follow_the_official_configs() {
        let mut seen = 0;
        for p in all().iter().filter(|p| p.name.contains("_convnext_")) {
            if p.name.starts_with("demo_") {
                continue;
            }
            let c = p.config();
            let big = p.name.contains("_large_") || p.name.contains("_xlarge_");
            let toml = c.to_toml().unwrap();
            let want = if big {
                "amp = \"fp32\""
            } else {
                "amp = \"fp16\""
            };
            assert!(toml.contains(want), "{}: {want} not in\n{toml}", p.name);
            assert_eq!(c.runtime.amp, if big { Amp::None } else { Amp::Fp16 });
            let tiny = p.name.contains("_tiny_");
            assert_eq!(
                c.optimizer.num_layers,
                if tiny { 6 } else { 12 },
                "{}",
                p.name
            );
            seen += 1;
        }
        assert_eq!(seen, 13);
        // Older files that wrote `amp = "none"` still read as fp32.
        let mut c = find("demo_mask_rcnn_convnext_nano").unwrap().config();
        c.runtime.amp = Amp::Fp16;
        let old = c
            .to_toml()
            .unwrap()
            .replace("amp = \"fp16\"", "amp = \"none\"");
        let back: Config = toml::from_str(&old).unwrap();
        assert_eq!(back.runtime.amp, Amp::None);
    }

    #[test]
    fn comparison_rows_follow_the_swin_recipes() {
        // (name, variant, lr, weight decay, drop path) as the Swin detection/segmentation configs.
        let table = [
            ("mask_rcnn_swin_tiny_3x", "swin_tiny", 1e-4, 0.05, 0.2),
            ("cascade_mask_rcnn_r50_3x", "resnet50", 1e-4, 0.05, 0.0),
            (
                "cascade_mask_rcnn_x101_64x4d_3x",
                "resnext101_64x4d",
                1e-4,
                0.05,
                0.0,
            ),
            (
                "cascade_mask_rcnn_swin_base_3x_in22k",
                "swin_base",
                1e-4,
                0.05,
                0.3,
            ),
            ("upernet_swin_tiny_512_160k", "swin_tiny", 6e-5, 0.01, 0.3),
            (
                "upernet_swin_large_640_160k_in22k",
                "swin_large",
                6e-5,
                0.01,
                0.3,
            ),
        ];
        for (name, variant, lr, wd, dp) in table {
            let c = find(name).unwrap().config();
            assert_eq!(c.model.backbone_name(), Some(variant), "{name}");
            assert_eq!(c.optimizer.lr, lr, "{name}");
            assert_eq!(c.optimizer.weight_decay, wd, "{name}");
            assert_eq!(c.optimizer.decay_type, DecayType::None, "{name}");
            assert_eq!(c.model.drop_path_rate(), dp, "{name}");
            for k in ["relative_position_bias_table", "absolute_pos_embed", "norm"] {
                assert!(
                    c.optimizer.no_decay_keys.iter().any(|x| x == k),
                    "{name} {k}"
                );
            }
        }
        let c = find("upernet_swin_large_640_160k_in22k").unwrap().config();
        assert_eq!(c.data.crop_size, [640, 640]);
        assert_eq!(c.model.arch(), Arch::Upernet);
        assert_eq!(
            find("cascade_mask_rcnn_r50_3x")
                .unwrap()
                .config()
                .model
                .arch(),
            Arch::CascadeMaskRcnn
        );
    }
}
