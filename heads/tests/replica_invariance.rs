//! Data-parallel invariance of training: one process on 4 images must give the losses and the
//! gradients that 2 ranks × 2 images give after gradient averaging, when the model runs under
//! batch keys (keyed drop path, dropout and samplers) and a count reducer (global loss
//! normalizers). The two "ranks" run one after the other in this process, so the reducer is
//! simulated: a first pass over both halves records each reducer call's local count (calls
//! happen in the same order on every rank), a second pass answers call j with the sum of both
//! halves' counts at call j and world size 2.
//!
//! What is covered: Mask R-CNN (ConvNeXt with drop path > 0, FPN, RPN sampling and avg_factor,
//! RoI sampling, box and mask losses) and Cascade Mask R-CNN (three sampling stages, GIoU, box
//! heads with BN through the SyncBN hook) and UperNet (drop path, Dropout2d in both heads,
//! cross-entropy normalizers). BatchNorm in the Cascade box heads and UperNet's heads is
//! batch-dependent unless synchronized; a real SyncBN cannot run in one process, so those tests
//! install a batch-independent stand-in through the SyncBN hook (BatchNorm on running
//! statistics) — they check everything except BN's cross-image statistics, and that the hook is
//! what the heads call. Also covered: the controls fail (without keys the draws differ; without
//! the reducer the mask loss's positive-count normalizer does not combine).

use cnx_backbone::replica::{
    with_batch_keys, with_count_reducer, with_sync_batch_norm, BatchKeys, BatchNormParams,
};
use cnx_heads::cascade::{CascadeConfig, CascadeDetector};
use cnx_heads::conv_module::ConvModule;
use cnx_heads::segmentor::{Segmentor, SegmentorConfig};
use cnx_heads::{Detector, DetectorConfig, GtInstances, ImgMeta};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;
use tch::nn::{Module, ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

const H: i64 = 96;
const W: i64 = 128;
const SEED: u64 = 1234;
const ITER: u64 = 17;

mod common;
use common::box_gt;

/// 4 images of one size (so the batch padding is the same for 4 and 2 images) with 1-3 GT
/// boxes each.
fn det_inputs() -> (Tensor, Vec<ImgMeta>, Vec<GtInstances>) {
    tch::manual_seed(7);
    let images = Tensor::randn([4, 3, H, W], (Kind::Float, Device::Cpu));
    let boxes: [&[[f32; 4]]; 4] = [
        &[[8.0, 10.0, 60.0, 70.0], [40.0, 30.0, 120.0, 90.0]],
        &[[20.0, 5.0, 50.0, 40.0]],
        &[
            [5.0, 50.0, 70.0, 95.0],
            [70.0, 10.0, 125.0, 60.0],
            [30.0, 30.0, 60.0, 60.0],
        ],
        &[[60.0, 40.0, 110.0, 80.0], [10.0, 10.0, 40.0, 30.0]],
    ];
    let gts = boxes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let labels: Vec<i64> = (0..b.len() as i64).map(|k| (i as i64 + k) % 5).collect();
            // Masks a quarter in from each side: crops are neither all 0 nor all 1, so the mask
            // loss has a real target.
            box_gt(b, &labels, 0.25)
        })
        .collect();
    let meta = ImgMeta {
        img_shape: (H, W),
        pad_shape: cnx_heads::structures::pad_shape((H, W), 32),
        ori_shape: (H, W),
        scale_factor: (1.0, 1.0),
    };
    (images, vec![meta; 4], gts)
}

fn small_mask_rcnn() -> DetectorConfig {
    let mut c = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
    c.backbone.depths = vec![1, 1, 2, 1];
    c.backbone.dims = vec![16, 32, 64, 128];
    // Large so that most blocks drop some image: drop path must be keyed per image.
    c.backbone.drop_path_rate = 0.5;
    c.neck.out_channels = 32;
    c.roi.fc_dim = 64;
    c.roi.mask_conv_channels = 32;
    c.roi.num_classes = 5;
    c
}

/// Losses (as f64) and gradients (by variable name; zeros where none) of one forward/backward.
struct Step {
    losses: BTreeMap<String, f64>,
    grads: BTreeMap<String, Tensor>,
}

fn zero_grads(vs: &VarStore) {
    for (_, v) in vs.variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn collect(vs: &VarStore, losses: BTreeMap<String, f64>) -> Step {
    let grads = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .map(|(k, v)| {
            let g = v.grad();
            let g = if g.defined() {
                g.copy()
            } else {
                Tensor::zeros_like(&v)
            };
            (k, g)
        })
        .collect();
    Step { losses, grads }
}

/// How the count reducer behaves during one pass.
enum Counts {
    /// No reducer: plain single-process means.
    Local,
    /// Record each call's local count (results unused).
    Record(Rc<RefCell<Vec<f64>>>),
    /// Call j returns `totals[j]`, world size 2.
    Replay(Rc<Vec<f64>>),
}

/// Runs `fwd` (forward + backward, returning named losses) under optional keys and the given
/// reducer mode.
fn pass(
    keys: Option<&[u64]>,
    counts: &Counts,
    fwd: &dyn Fn() -> BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    let with_counts = || match counts {
        Counts::Local => fwd(),
        Counts::Record(rec) => {
            let rec = rec.clone();
            with_count_reducer(
                1,
                move |c| {
                    rec.borrow_mut().push(f64::try_from(c).unwrap());
                    c.shallow_clone()
                },
                fwd,
            )
        }
        Counts::Replay(totals) => {
            let totals = totals.clone();
            let call = Cell::new(0usize);
            with_count_reducer(
                2,
                move |c| {
                    let j = call.replace(call.get() + 1);
                    Tensor::from(totals[j]).to_device(c.device())
                },
                fwd,
            )
        }
    };
    match keys {
        Some(s) => with_batch_keys(
            BatchKeys {
                seed: SEED,
                iteration: ITER,
                samples: s.to_vec(),
            },
            with_counts,
        ),
        None => with_counts(),
    }
}

/// 1 × 4 images vs 2 × 2 images: returns (full, [half0, half1]) steps. `step(lo, hi)` runs the
/// model forward + backward on images lo..hi and returns the named losses; keys are the global
/// sample indices lo..hi when `keyed`. With `reduce`, the halves run with the simulated
/// all-reduce of counts; without it, with local means.
fn full_and_halves(
    vs: &VarStore,
    keyed: bool,
    reduce: bool,
    step: &dyn Fn(i64, i64) -> BTreeMap<String, f64>,
) -> (Step, [Step; 2]) {
    let keys = |lo: u64, hi: u64| keyed.then(|| (lo..hi).collect::<Vec<u64>>());
    let run = |lo: i64, hi: i64, counts: &Counts| {
        zero_grads(vs);
        tch::manual_seed(99);
        let k = keys(lo as u64, hi as u64);
        let losses = pass(k.as_deref(), counts, &|| step(lo, hi));
        collect(vs, losses)
    };
    let full = run(0, 4, &Counts::Local);
    if !reduce {
        return (full, [run(0, 2, &Counts::Local), run(2, 4, &Counts::Local)]);
    }
    let rec = [Rc::new(RefCell::new(vec![])), Rc::new(RefCell::new(vec![]))];
    let _ = run(0, 2, &Counts::Record(rec[0].clone()));
    let _ = run(2, 4, &Counts::Record(rec[1].clone()));
    let (a, b) = (rec[0].borrow(), rec[1].borrow());
    assert_eq!(a.len(), b.len(), "ranks must reach the same reductions");
    assert!(!a.is_empty(), "no count reduction was called");
    let totals = Rc::new(
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| x + y)
            .collect::<Vec<_>>(),
    );
    println!(
        "count reductions per forward: {}; local counts {a:?} + {b:?}",
        a.len()
    );
    let h0 = run(0, 2, &Counts::Replay(totals.clone()));
    let h1 = run(2, 4, &Counts::Replay(totals));
    (full, [h0, h1])
}

/// ‖g_full − mean(g_halves)‖ / ‖g_full‖ over all parameters.
fn grad_rel_diff(full: &Step, halves: &[Step; 2]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (k, g) in &full.grads {
        let m = (&halves[0].grads[k] + &halves[1].grads[k]) / 2.0;
        num += f64::try_from((g - m).square().sum(Kind::Double)).unwrap();
        den += f64::try_from(g.square().sum(Kind::Double)).unwrap();
    }
    assert!(den > 0.0, "no gradient");
    (num / den).sqrt()
}

/// Max over `keys` of |L_full − mean(L_halves)| / max(|L_full|, 1e-3).
fn loss_rel_diff(full: &Step, halves: &[Step; 2], keys: &[&str]) -> f64 {
    keys.iter()
        .map(|k| {
            let f = full.losses[*k];
            let m = (halves[0].losses[*k] + halves[1].losses[*k]) / 2.0;
            println!("  {k}: 1x4 {f:.7}  mean(2x2) {m:.7}");
            (f - m).abs() / f.abs().max(1e-3)
        })
        .fold(0.0, f64::max)
}

fn det_step<'a>(
    det: &'a Detector,
    images: &'a Tensor,
    metas: &'a [ImgMeta],
    gts: &'a [GtInstances],
) -> impl Fn(i64, i64) -> BTreeMap<String, f64> + 'a {
    move |lo, hi| {
        let r = lo as usize..hi as usize;
        let l = det.forward_train(&images.narrow(0, lo, hi - lo), &metas[r.clone()], &gts[r]);
        l.total().backward();
        l.0.iter()
            .map(|(k, v)| (k.clone(), f64::try_from(v).unwrap()))
            .collect()
    }
}

const MASK_RCNN_LOSSES: [&str; 5] = [
    "loss_rpn_cls",
    "loss_rpn_bbox",
    "loss_cls",
    "loss_bbox",
    "loss_mask",
];

#[test]
fn mask_rcnn_four_images_equal_two_ranks_of_two() {
    let t0 = Instant::now();
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let det = Detector::new(&vs.root(), &small_mask_rcnn());
    let (images, metas, gts) = det_inputs();
    let step = det_step(&det, &images, &metas, &gts);

    let (full, halves) = full_and_halves(&vs, true, true, &step);
    let lr = loss_rel_diff(&full, &halves, &MASK_RCNN_LOSSES);
    let gr = grad_rel_diff(&full, &halves);
    println!("keyed + reduced: loss rel diff {lr:.2e}, grad rel diff {gr:.2e}");
    assert!(lr < 1e-5, "losses: {lr}");
    assert!(gr < 1e-5, "gradients: {gr}");

    // Controls: the comparison can fail. Without keys the draws (drop path, samplers) depend
    // on the batch; without the reducer the mask loss (mean over a batch's positives, whose
    // number differs between the halves) does not combine, while the RPN's and RoI head's
    // normalizers here are per-image constants (256 anchors, 512 RoIs per image).
    let (full, halves) = full_and_halves(&vs, false, true, &step);
    let gr = grad_rel_diff(&full, &halves);
    println!("unkeyed: grad rel diff {gr:.2e}");
    assert!(gr > 1e-3, "unkeyed draws reproduced the 4-image run: {gr}");
    let (full, halves) = full_and_halves(&vs, true, false, &step);
    let lr = loss_rel_diff(&full, &halves, &["loss_mask"]);
    println!("local means: loss_mask rel diff {lr:.2e}");
    assert!(lr > 1e-4, "local mask-loss means combined: {lr}");
    println!("took {:.1}s", t0.elapsed().as_secs_f64());
}

/// A "SyncBN" that gives every image the same normalization whatever its batch: BatchNorm on
/// the running statistics (what a real SyncBN cannot be tested against in one process).
/// Counts its calls.
fn running_stats_bn(calls: Rc<Cell<usize>>) -> impl Fn(&Tensor, &BatchNormParams) -> Tensor {
    move |x, p| {
        calls.set(calls.get() + 1);
        Tensor::batch_norm(
            x,
            p.weight,
            p.bias,
            Some(p.running_mean),
            Some(p.running_var),
            false,
            p.momentum,
            p.eps,
            false,
        )
    }
}

#[test]
fn cascade_four_images_equal_two_ranks_of_two() {
    let t0 = Instant::now();
    tch::manual_seed(0);
    let mut cfg = CascadeConfig::cascade_mask_rcnn_convnext("tiny").unwrap();
    let small = small_mask_rcnn();
    cfg.base.backbone = small.backbone;
    cfg.base.neck = small.neck;
    cfg.base.roi = small.roi;
    cfg.conv_channels = 16;
    let vs = VarStore::new(Device::Cpu);
    let det = CascadeDetector::new(&vs.root(), &cfg);
    let (images, metas, gts) = det_inputs();
    let step = det_step(&det, &images, &metas, &gts);
    let calls = Rc::new(Cell::new(0));
    let (full, halves) = with_sync_batch_norm(running_stats_bn(calls.clone()), || {
        full_and_halves(&vs, true, true, &step)
    });
    // 4 shared convs × 3 stages per forward.
    assert!(calls.get() >= 12, "SyncBN hook calls: {}", calls.get());
    let mut keys: Vec<String> = vec!["loss_rpn_cls".into(), "loss_rpn_bbox".into()];
    for s in 0..3 {
        for l in ["loss_cls", "loss_bbox", "loss_mask"] {
            keys.push(format!("s{s}.{l}"));
        }
    }
    let keys: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
    let lr = loss_rel_diff(&full, &halves, &keys);
    let gr = grad_rel_diff(&full, &halves);
    println!("cascade: loss rel diff {lr:.2e}, grad rel diff {gr:.2e}");
    assert!(lr < 1e-5, "losses: {lr}");
    assert!(gr < 1e-5, "gradients: {gr}");
    println!("took {:.1}s", t0.elapsed().as_secs_f64());
}

#[test]
fn upernet_four_images_equal_two_ranks_of_two() {
    let t0 = Instant::now();
    tch::manual_seed(0);
    let mut cfg = SegmentorConfig::upernet_convnext("tiny").unwrap();
    cfg.backbone.depths = vec![1, 1, 2, 1];
    cfg.backbone.dims = vec![16, 32, 64, 128];
    cfg.backbone.drop_path_rate = 0.5;
    cfg.decode_head.channels = 32;
    // Large so that channel masks surely differ between keyed and unkeyed draws.
    cfg.decode_head.dropout_ratio = 0.3;
    let aux = cfg.auxiliary_head.as_mut().unwrap();
    aux.channels = 16;
    aux.dropout_ratio = 0.3;
    cfg.num_classes = 7;
    let vs = VarStore::new(Device::Cpu);
    let seg = Segmentor::new(&vs.root(), &cfg).unwrap();
    tch::manual_seed(3);
    let images = Tensor::randn([4, 3, 64, 64], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(7, [4, 64, 64], (Kind::Int64, Device::Cpu));
    // Some ignored pixels (255), a different number per image.
    let ignore = Tensor::rand([4, 64, 64], (Kind::Float, Device::Cpu))
        .lt_tensor(&Tensor::from_slice(&[0.0f32, 0.1, 0.3, 0.6]).view([4, 1, 1]));
    let labels = labels.masked_fill(&ignore, 255);
    let step = |lo: i64, hi: i64| {
        let l = seg.forward_train(
            &images.narrow(0, lo, hi - lo),
            &labels.narrow(0, lo, hi - lo),
        );
        l.total().backward();
        l.items
            .iter()
            .map(|(k, v)| (k.clone(), f64::try_from(v).unwrap()))
            .collect::<BTreeMap<_, _>>()
    };
    let calls = Rc::new(Cell::new(0));
    let keys = ["decode.loss_seg", "aux.loss_seg"];
    let (full, halves) = with_sync_batch_norm(running_stats_bn(calls.clone()), || {
        full_and_halves(&vs, true, true, &step)
    });
    assert!(
        calls.get() > 0,
        "the heads' BN did not go through the SyncBN hook"
    );
    let lr = loss_rel_diff(&full, &halves, &keys);
    let gr = grad_rel_diff(&full, &halves);
    println!("upernet: loss rel diff {lr:.2e}, grad rel diff {gr:.2e}");
    assert!(lr < 1e-5, "losses: {lr}");
    assert!(gr < 1e-5, "gradients: {gr}");
    // Control: unkeyed drop path / Dropout2d depend on the batch.
    let (full, halves) = with_sync_batch_norm(running_stats_bn(calls), || {
        full_and_halves(&vs, false, true, &step)
    });
    let gr = grad_rel_diff(&full, &halves);
    println!("upernet unkeyed: grad rel diff {gr:.2e}");
    assert!(gr > 1e-3, "unkeyed draws reproduced the 4-image run: {gr}");
    println!("took {:.1}s", t0.elapsed().as_secs_f64());
}

#[test]
fn sync_bn_hook_is_used_in_training_only() {
    let vs = VarStore::new(Device::Cpu);
    let m = ConvModule::new(vs.root() / "m", 3, 4, 3, 1);
    let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
    let calls = Rc::new(Cell::new(0));
    let c = calls.clone();
    let marker = move |x: &Tensor, p: &BatchNormParams| {
        c.set(c.get() + 1);
        assert_eq!((p.momentum, p.eps), (0.1, 1e-5));
        assert!(p.weight.is_some() && p.bias.is_some());
        x.zeros_like() + 42.0
    };
    let (train, eval) =
        with_sync_batch_norm(marker, || (m.forward_t(&x, true), m.forward_t(&x, false)));
    assert_eq!(calls.get(), 1, "hook calls (train + eval)");
    // The hook's output went through ReLU; eval used the layer itself.
    assert!(train.equal(&Tensor::full(
        [2, 4, 8, 8],
        42.0,
        (Kind::Float, Device::Cpu)
    )));
    assert!(!eval.equal(&train));
    // Without the hook training uses local batch statistics, as before.
    let plain = m.forward_t(&x, true);
    let bn_out = m.bn.inner.forward_t(&m.conv.inner.forward(&x), true).relu();
    assert!((plain - bn_out).abs().max().double_value(&[]) < 1e-6);
    assert_eq!(calls.get(), 1);
}
