//! Detector-level behaviour: FLOPs / params as mmdet's get_flops counts them (paper: 262G, 48M),
//! checkpoint handling (mmdet layout, other class counts, ImageNet backbone), tiny images,
//! COCO results conversion, config round trip.

use cnx_backbone::checkpoint::{read_state_dict, StateDict};
use cnx_heads::weights::{load_checkpoint, load_state_dict};
use cnx_heads::{Detector, DetectorConfig, HeadsError, ImgMeta};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const CKPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/detection/mmdet_ckpt.pth"
);

fn small_config(classes: i64) -> DetectorConfig {
    let mut c = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
    c.backbone.depths = vec![1, 1, 2, 1];
    c.backbone.dims = vec![16, 32, 64, 128];
    c.neck.out_channels = 64;
    c.roi.fc_dim = 128;
    c.roi.mask_conv_channels = 64;
    c.roi.num_classes = classes;
    c
}

#[test]
fn flops_and_params_match_the_paper() {
    let cfg = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
    let (params, tally) = cnx_heads::two_stage::complexity(&cfg, [1280, 800]);
    println!("params {params}, flops {:.2}G", tally.total / 1e9);
    assert!((params as f64 / 1e6 - 48.0).abs() < 0.5, "params {params}");
    assert!(
        (tally.total / 1e9 - 262.0).abs() / 262.0 < 0.005,
        "flops {}",
        tally.total
    );
}

#[test]
fn other_class_count_is_refused_with_a_hint_then_loads_without_class_layers() {
    let mut vs = VarStore::new(Device::Cpu);
    let _det = Detector::new(&vs.root(), &small_config(20));
    let err = load_checkpoint(&mut vs, CKPT, false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HeadsError::ClassMismatch(_)));
    assert!(
        msg.contains("80 classes") && msg.contains("--drop-class-layers"),
        "{msg}"
    );
    let report = load_checkpoint(&mut vs, CKPT, true).unwrap();
    assert!(report
        .missing
        .iter()
        .all(|(k, _)| k.contains("fc_cls") || k.contains("fc_reg") || k.contains("conv_logits")));
    assert_eq!(report.missing.len(), 6);
}

#[test]
fn imagenet_checkpoint_loads_into_the_backbone_only() {
    // An ImageNet-layout checkpoint: the fixture's backbone without `backbone.` and `norm{i}`,
    // plus the classifier's `norm` and `head`.
    let sd = read_state_dict(CKPT).unwrap();
    let mut inet = StateDict::new();
    for (k, t) in sd.iter() {
        if let Some(b) = k.strip_prefix("backbone.") {
            if !b.starts_with("norm") {
                inet.insert(b.to_string(), t.shallow_clone());
            }
        }
    }
    inet.insert(
        "norm.weight",
        Tensor::ones([128], (Kind::Float, Device::Cpu)),
    );
    inet.insert(
        "norm.bias",
        Tensor::zeros([128], (Kind::Float, Device::Cpu)),
    );
    inet.insert(
        "head.weight",
        Tensor::zeros([1000, 128], (Kind::Float, Device::Cpu)),
    );
    inet.insert(
        "head.bias",
        Tensor::zeros([1000], (Kind::Float, Device::Cpu)),
    );
    let mut vs = VarStore::new(Device::Cpu);
    let _det = Detector::new(&vs.root(), &small_config(80));
    let report = load_state_dict(&mut vs, &inet, false).unwrap();
    assert_eq!(report.loaded.len(), inet.len() - 4);
    assert!(report.loaded.iter().all(|k| k.starts_with("backbone.")));
    assert!(
        report
            .missing
            .iter()
            .all(|(k, _)| k.starts_with("backbone.norm")),
        "{report}"
    );
}

#[test]
fn tiny_images_are_padded_and_masks_come_at_the_original_size() {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let mut cfg = small_config(3);
    cfg.roi.test.score_thr = 0.0;
    let det = Detector::new(&vs.root(), &cfg);
    let x = Tensor::randn([1, 3, 20, 13], (Kind::Float, Device::Cpu));
    let meta = ImgMeta {
        img_shape: (20, 13),
        pad_shape: cnx_heads::structures::pad_shape((20, 13), 32),
        ori_shape: (10, 7),
        scale_factor: (13.0 / 7.0, 2.0),
    };
    let d = det.predict(&x, &[meta]);
    let m = d[0].masks.as_ref().unwrap();
    assert_eq!(&m.size()[1..], &[10, 7]);
}

#[test]
fn config_round_trips_through_json_and_rejects_unknown_fields() {
    let c = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
    let s = serde_json::to_string(&c).unwrap();
    let back: DetectorConfig = serde_json::from_str(&s).unwrap();
    assert_eq!(c, back);
    assert!(DetectorConfig::mask_rcnn_convnext("huge").is_err());
    // A misspelt field anywhere in the model is an error, not a silently ignored setting.
    let typo = s.replace("\"fc_dim\"", "\"fc_dims\"");
    assert!(serde_json::from_str::<DetectorConfig>(&typo).is_err());
}

#[test]
fn training_with_an_image_without_boxes_gives_finite_losses() {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let det = Detector::new(&vs.root(), &small_config(3));
    let x = Tensor::randn([2, 3, 64, 96], (Kind::Float, Device::Cpu));
    let metas = vec![
        ImgMeta {
            img_shape: (64, 96),
            pad_shape: cnx_heads::structures::pad_shape((64, 96), 32),
            ori_shape: (64, 96),
            scale_factor: (1.0, 1.0)
        };
        2
    ];
    let gts = vec![
        cnx_heads::GtInstances {
            boxes: Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
            labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            masks: None,
        },
        cnx_heads::GtInstances {
            boxes: Tensor::from_slice(&[10f32, 8., 50., 40.]).view([1, 4]),
            labels: Tensor::from_slice(&[2i64]),
            masks: None,
        },
    ];
    let losses = det.forward_train(&x, &metas, &gts);
    for (k, v) in losses.values() {
        assert!(v.is_finite(), "{k} = {v}");
    }
    losses.total().backward();
}
