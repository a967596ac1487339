//! Budget of host reads and uploads (`cnx_heads::sync_count`) of the detection heads: one
//! Mask R-CNN and one Cascade Mask R-CNN training iteration on 2 images, and one test image
//! each, on small models. Each count must stay under a bound, so that a change that brings a
//! host read back into a hot path (a stream sync per call on GPU) fails here, on CPU.
//!
//! One test function only: the counters are process-wide and other tests of the same binary
//! would add to them concurrently.

use cnx_heads::cascade::{CascadeConfig, CascadeDetector};
use cnx_heads::sync_count::{self, with_device_paths, SyncCounts};
use cnx_heads::{Detector, DetectorConfig, GtInstances, ImgMeta};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const H: i64 = 160;
const W: i64 = 224;

mod common;
use common::box_gt;

fn inputs() -> (Tensor, Vec<ImgMeta>, Vec<GtInstances>) {
    tch::manual_seed(3);
    let images = Tensor::randn([2, 3, H, W], (Kind::Float, Device::Cpu));
    let boxes: [&[[f32; 4]]; 2] = [
        &[[8.0, 10.0, 90.0, 120.0], [60.0, 30.0, 200.0, 150.0]],
        &[
            [20.0, 5.0, 50.0, 40.0],
            [100.0, 60.0, 180.0, 140.0],
            [5.0, 80.0, 70.0, 155.0],
        ],
    ];
    let gts = boxes
        .iter()
        .map(|b| {
            let labels: Vec<i64> = (0..b.len() as i64).map(|k| k % 5).collect();
            box_gt(b, &labels, 0.0)
        })
        .collect();
    let meta = ImgMeta {
        img_shape: (H, W),
        pad_shape: cnx_heads::structures::pad_shape((H, W), 32),
        ori_shape: (200, 280),
        scale_factor: (0.8, 0.8),
    };
    (images, vec![meta; 2], gts)
}

fn small_mask_rcnn() -> DetectorConfig {
    let mut c = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
    c.backbone.depths = vec![1, 1, 1, 1];
    c.backbone.dims = vec![8, 16, 32, 64];
    c.neck.out_channels = 16;
    c.roi.fc_dim = 32;
    c.roi.mask_conv_channels = 16;
    c.roi.num_classes = 5;
    c
}

/// Counts of one training iteration (2 images) and of one test image, after a warm-up pass
/// (constants are uploaded once per device and process; a warm run does not count them), with
/// the device-resident paths a GPU run takes. Also checks that the test image's detections
/// are the host paths' ones.
fn measure(det: &Detector) -> (SyncCounts, SyncCounts, usize) {
    let (images, metas, gts) = inputs();
    let one = images.narrow(0, 0, 1);
    let train = with_device_paths(|| {
        let _ = det.forward_train(&images, &metas, &gts);
        let _ = det.predict(&one, &metas[..1]);
        let t0 = sync_count::snapshot();
        let losses = det.forward_train(&images, &metas, &gts);
        losses.total().backward();
        sync_count::snapshot().since(&t0)
    });
    // After the last training pass (it updates BatchNorm statistics of Cascade's box heads).
    let host = det.predict(&one, &metas[..1]);
    with_device_paths(|| {
        let t1 = sync_count::snapshot();
        let dets = det.predict(&one, &metas[..1]);
        let test = sync_count::snapshot().since(&t1);
        let (a, b) = (&host[0], &dets[0]);
        assert_eq!(a.boxes.size(), b.boxes.size());
        assert!(a.boxes.equal(&b.boxes) && a.scores.equal(&b.scores));
        assert!(a.labels.equal(&b.labels));
        let (ma, mb) = (a.masks.as_ref().unwrap(), b.masks.as_ref().unwrap());
        assert!(ma.equal(mb), "pasted masks differ");
        (train, test, b.boxes.size()[0] as usize)
    })
}

/// Before this budget (mmdet-equivalent code with host NMS, per-level RoIAlign planning,
/// per-call constants) the same runs counted: Mask R-CNN 51 reads + 35 uploads per training
/// iteration and 31 + 23 per test image; Cascade 119 + 67 and 51 + 35.
#[test]
fn host_reads_and_uploads_stay_within_budget() {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let det = Detector::new(&vs.root(), &small_mask_rcnn());
    let (train, test, n) = measure(&det);
    println!("mask r-cnn: train iteration (2 images) {train:?}; test image ({n} dets) {test:?}");

    tch::manual_seed(0);
    let mut cfg = CascadeConfig::cascade_mask_rcnn_convnext("tiny").unwrap();
    let small = small_mask_rcnn();
    cfg.base.backbone = small.backbone;
    cfg.base.neck = small.neck;
    cfg.base.roi = small.roi;
    cfg.conv_channels = 16;
    let vs = VarStore::new(Device::Cpu);
    let cdet = CascadeDetector::new(&vs.root(), &cfg);
    let (ctrain, ctest, cn) = measure(&cdet);
    println!("cascade: train iteration (2 images) {ctrain:?}; test image ({cn} dets) {ctest:?}");
    assert!(n > 0 && cn > 0, "the test images need detections");
    // What remains (see `cnx_heads::sync_count`'s module docs): per image the sampling counts,
    // the proposals' valid-box filter and NMS, the score threshold, two per RoI extractor call,
    // the mask targets cropped on the host from the GT masks.
    let bound = |c: SyncCounts, reads: u64, uploads: u64, what: &str| {
        assert!(
            c.host_reads <= reads && c.uploads <= uploads,
            "{what}: {c:?}, budget {reads} reads / {uploads} uploads"
        );
    };
    bound(train, 16, 4, "mask r-cnn training iteration");
    bound(test, 8, 2, "mask r-cnn test image");
    bound(ctrain, 40, 8, "cascade training iteration");
    bound(ctest, 12, 2, "cascade test image");
}
