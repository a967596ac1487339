//! The device-resident variants of the heads' hot paths (suppression-matrix NMS, batched mask
//! pasting, the one-call multi-level RoI extractor), forced on CPU with
//! `sync_count::with_device_paths`, give exactly the host variants' results: the same kept
//! indices in the same order, the same pasted pixels, the same pooled features. Plus the NMS
//! fixtures of torchvision through the device path, and (ignored by default) CPU timings.

use cnx_heads::boxes::to_vec_i64;
use cnx_heads::mask_head::{paste_masks, paste_masks_batched};
use cnx_heads::nms::{batched_nms, mmcv_batched_nms, nms, nms_device};
use cnx_heads::roi_align::roi_align;
use cnx_heads::roi_extractor::RoiExtractor;
use cnx_heads::structures::Rois;
use cnx_heads::sync_count::with_device_paths;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

mod common;
use common::ops_fixtures as fixtures;

/// `n` boxes in clusters (so that many overlap) inside a `side`-px image, scores with ties.
fn boxes(n: i64, side: f64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let opts = (Kind::Float, Device::Cpu);
    let centers = Tensor::rand([n / 20 + 1, 2], opts) * side;
    let pick = Tensor::randint(n / 20 + 1, [n], (Kind::Int64, Device::Cpu));
    let c = centers.index_select(0, &pick) + Tensor::randn([n, 2], opts) * 6.0;
    let wh = Tensor::rand([n, 2], opts) * 60.0 + 4.0;
    let b = Tensor::cat(&[&c - &wh * 0.5, &c + &wh * 0.5], 1).clamp(0.0, side);
    // Scores rounded to 1/64: plenty of ties, which must keep index order.
    let s = (Tensor::rand([n], opts) * 64.0).floor() / 64.0;
    (b, s)
}

#[test]
fn device_nms_equals_host_nms() {
    for (n, seed) in [(1, 1), (7, 2), (65, 3), (500, 4), (2000, 5)] {
        let (b, s) = boxes(n, 400.0, seed);
        let ids = Tensor::randint(5, [n], (Kind::Int64, Device::Cpu));
        for thr in [0.3, 0.5, 0.7] {
            let host = to_vec_i64(&nms(&b, &s, thr));
            let dev = to_vec_i64(&nms_device(&b, &s, None, thr));
            assert_eq!(host, dev, "nms n={n} thr={thr}");
            let forced = to_vec_i64(&with_device_paths(|| nms(&b, &s, thr)));
            assert_eq!(host, forced, "forced nms n={n} thr={thr}");
            let host = to_vec_i64(&batched_nms(&b, &s, &ids, thr));
            let dev = to_vec_i64(&with_device_paths(|| batched_nms(&b, &s, &ids, thr)));
            assert_eq!(host, dev, "batched nms n={n} thr={thr}");
        }
    }
    // Degenerate boxes (zero area: NaN IoU with each other, never suppressing) and duplicates.
    let b = Tensor::from_slice(&[
        0f32, 0., 0., 0., 0., 0., 0., 0., 1., 1., 5., 5., 1., 1., 5., 5., 2., 2., 2., 9.,
    ])
    .view([5, 4]);
    let s = Tensor::from_slice(&[0.5f32, 0.5, 0.9, 0.9, 0.1]);
    assert_eq!(
        to_vec_i64(&nms(&b, &s, 0.5)),
        to_vec_i64(&nms_device(&b, &s, None, 0.5))
    );
}

/// mmcv's per-id path (≥ 10000 candidates): the same-id suppression matrix gives the per-id
/// loop's indices in its order.
#[test]
fn device_split_nms_equals_per_id_loop() {
    let (b, s) = boxes(12000, 800.0, 9);
    let ids = Tensor::randint(40, [12000], (Kind::Int64, Device::Cpu));
    for thr in [0.5, 0.7] {
        let host = to_vec_i64(&mmcv_batched_nms(&b, &s, &ids, thr));
        let dev = to_vec_i64(&with_device_paths(|| mmcv_batched_nms(&b, &s, &ids, thr)));
        assert_eq!(host, dev, "split nms thr={thr}");
    }
}

#[test]
fn device_nms_matches_torchvision_fixtures() {
    let f = fixtures();
    for k in ["03", "05", "07"] {
        let thr: f64 = format!("0.{}", &k[1..]).parse().unwrap();
        with_device_paths(|| {
            let keep = nms(&f["nms_boxes"], &f["nms_scores"], thr);
            assert_eq!(to_vec_i64(&keep), to_vec_i64(&f[&format!("nms_keep_{k}")]));
            let keep = batched_nms(&f["nms_boxes"], &f["nms_scores"], &f["nms_idxs"], thr);
            assert_eq!(to_vec_i64(&keep), to_vec_i64(&f[&format!("bnms_keep_{k}")]));
        });
    }
}

#[test]
fn batched_paste_equals_per_box_paste() {
    tch::manual_seed(11);
    let (h, w) = (83, 121);
    let n = 40;
    let masks = Tensor::rand([n, 28, 28], (Kind::Float, Device::Cpu));
    let xy = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 140.0 - 15.0;
    let wh = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * 70.0;
    let mut b = Tensor::cat(&[xy.shallow_clone(), &xy + &wh], 1);
    // A zero-width box, a box fully outside, a sub-pixel box.
    let extra = Tensor::from_slice(&[
        10f32, 10., 10., 30., 200., 5., 230., 20., 50.2, 40.1, 50.7, 40.4,
    ])
    .view([3, 4]);
    b = Tensor::cat(&[b, extra], 0);
    let masks = Tensor::cat(
        &[masks, Tensor::rand([3, 28, 28], (Kind::Float, Device::Cpu))],
        0,
    );
    for thr in [0.5, 0.3] {
        let host = paste_masks(&masks, &b, h, w, thr);
        let dev = paste_masks_batched(&masks, &b, h, w, thr);
        assert_eq!(host.size(), dev.size());
        let diff = host.logical_xor(&dev).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(diff, 0, "pixels differ at thr {thr}");
        assert!(host.sum(Kind::Int64).int64_value(&[]) > 1000);
    }
    let empty = paste_masks_batched(&masks.slice(0, 0, 0, 1), &b.slice(0, 0, 0, 1), h, w, 0.5);
    assert_eq!(empty.size(), vec![0, h, w]);
}

/// The extractor's one-call multi-level RoIAlign equals mmdet's level loop (RoIAlign of each
/// level's RoIs on that level, scattered back), bit for bit, gradients included; RoIs with a
/// NaN size get zeros.
#[test]
fn multilevel_extractor_equals_per_level_roi_align() {
    tch::manual_seed(5);
    let strides = vec![4, 8, 16, 32];
    let feats: Vec<Tensor> = [(2, 6, 48, 64), (2, 6, 24, 32), (2, 6, 12, 16), (2, 6, 6, 8)]
        .iter()
        .map(|&(n, c, h, w)| {
            Tensor::randn([n, c, h, w], (Kind::Float, Device::Cpu)).set_requires_grad(true)
        })
        .collect();
    let r = 300;
    let xy = Tensor::rand([r, 2], (Kind::Float, Device::Cpu)) * 230.0;
    let wh = (Tensor::rand([r, 2], (Kind::Float, Device::Cpu)) * 5.0).exp() + 1.0;
    let boxes = Tensor::cat(&[xy.shallow_clone(), &xy + wh], 1);
    let rois = Rois::from_boxes(&[&boxes.slice(0, 0, 170, 1), &boxes.slice(0, 170, r, 1)]);
    let _ = rois.rows.get(3).get(1).fill_(f64::NAN);
    for s in [7, 14] {
        let ex = RoiExtractor::new(s, strides.clone());
        let got = ex.forward(&feats, &rois);
        let levels = ex.map_levels(&rois.rows);
        let mut want = Tensor::zeros([r, 6, s, s], (Kind::Float, Device::Cpu));
        for (l, st) in strides.iter().enumerate() {
            let inds = levels.eq(l as i64).nonzero().view([-1]);
            if inds.size()[0] == 0 {
                continue;
            }
            let pooled = roi_align(
                &feats[l],
                &rois.rows.index_select(0, &inds),
                (s, s),
                1.0 / *st as f64,
                0,
                true,
            );
            want = want.index_copy(0, &inds, &pooled);
        }
        let d = (&got - &want).abs().max().double_value(&[]);
        assert_eq!(d, 0.0, "size {s}: pooled features differ by {d}");
        assert_eq!(got.get(3).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let go = Tensor::randn_like(&got);
        let g1 = Tensor::run_backward(&[(&got * &go).sum(Kind::Float)], &feats, true, false);
        let g2 = Tensor::run_backward(&[(&want * &go).sum(Kind::Float)], &feats, false, false);
        for (a, b) in g1.iter().zip(&g2) {
            // A level no RoI maps to gets no gradient either way.
            assert_eq!(a.defined(), b.defined());
            if !a.defined() {
                continue;
            }
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-5, "size {s}: gradients differ by {d}");
        }
    }
}

/// CPU timings of the two NMS implementations (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn nms_cpu_timings() {
    for n in [2000, 4000, 10000] {
        let (b, s) = boxes(n, 1000.0, 21);
        let ids = Tensor::randint(80, [n], (Kind::Int64, Device::Cpu));
        let time = |f: &dyn Fn() -> Tensor| {
            let _ = f();
            let t = Instant::now();
            for _ in 0..5 {
                let _ = f();
            }
            t.elapsed().as_secs_f64() / 5.0 * 1e3
        };
        let host = time(&|| nms(&b, &s, 0.7));
        let dev = time(&|| nms_device(&b, &s, None, 0.7));
        let mh = time(&|| mmcv_batched_nms(&b, &s, &ids, 0.5));
        let md = time(&|| with_device_paths(|| mmcv_batched_nms(&b, &s, &ids, 0.5)));
        println!(
            "n={n}: nms host {host:.2} ms, device path {dev:.2} ms; \
             mmcv batched (80 ids) host {mh:.2} ms, device path {md:.2} ms"
        );
    }
}
