//! Multi-process tests of `sync_batch_norm` on Gloo: every rank holds a slice of one batch and
//! must get exactly what plain `Tensor::batch_norm` gives on the whole batch in one process
//! (outputs, running statistics, input gradient, summed parameter gradients). Every child builds
//! the whole batch from a fixed seed and computes that reference itself.

mod common;

use cnx_dist::{sync_batch_norm, DistEnv, ProcessGroup};
use common::{join, run_ranks};
use tch::{Device, Kind, Tensor};

const MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;

/// One batch and everything BN needs, identical in every process.
struct Batch {
    x: Tensor,
    /// The upstream gradient: the loss is `(out * g).sum()`.
    g: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl Batch {
    fn new(shape: &[i64], kind: Kind) -> Batch {
        tch::manual_seed(17);
        let opts = (kind, Device::Cpu);
        let c = shape[1];
        // A mean well away from 0 and a std of 2, so that a variance formula that cancels
        // (Σx² - N·mean² in the input dtype) would show up in the errors.
        let x = Tensor::randn(shape, opts) * 2.0 + 5.0;
        let g = Tensor::randn(shape, opts);
        let weight = Tensor::rand([c], opts) + 0.5;
        let bias = Tensor::randn([c], opts);
        let running_mean = Tensor::randn([c], opts) * 0.1;
        let running_var = Tensor::rand([c], opts) + 0.5;
        Batch {
            x,
            g,
            weight,
            bias,
            running_mean,
            running_var,
        }
    }
}

/// What one step of batch norm produced: output, input/weight/bias gradients, running stats.
struct Step {
    out: Tensor,
    grad_x: Tensor,
    grad_w: Tensor,
    grad_b: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

/// Leaves for one step on images `start..start + len` of the batch.
fn leaves(b: &Batch, start: i64, len: i64) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor) {
    (
        b.x.narrow(0, start, len).copy().set_requires_grad(true),
        b.g.narrow(0, start, len).copy(),
        b.weight.copy().set_requires_grad(true),
        b.bias.copy().set_requires_grad(true),
        b.running_mean.copy(),
        b.running_var.copy(),
    )
}

/// Plain single-process batch norm (training mode) on images `start..start + len`.
fn reference(b: &Batch, start: i64, len: i64) -> Step {
    let (x, g, w, bias, rm, rv) = leaves(b, start, len);
    let out = x.batch_norm(
        Some(&w),
        Some(&bias),
        Some(&rm),
        Some(&rv),
        true,
        MOMENTUM,
        EPS,
        false,
    );
    (&out * &g).sum(out.kind()).backward();
    Step {
        out: out.detach(),
        grad_x: x.grad(),
        grad_w: w.grad(),
        grad_b: bias.grad(),
        running_mean: rm,
        running_var: rv,
    }
}

/// `sync_batch_norm` on this rank's images `start..start + len`.
fn synced(pg: &ProcessGroup, b: &Batch, start: i64, len: i64) -> Step {
    let (x, g, w, bias, rm, rv) = leaves(b, start, len);
    let out = sync_batch_norm(pg, &x, Some(&w), Some(&bias), &rm, &rv, MOMENTUM, EPS).unwrap();
    assert_eq!(out.size(), x.size());
    assert_eq!(out.kind(), x.kind());
    (&out * &g).sum(out.kind()).backward();
    Step {
        out: out.detach(),
        grad_x: x.grad(),
        grad_w: w.grad(),
        grad_b: bias.grad(),
        running_mean: rm,
        running_var: rv,
    }
}

/// max |a - b| / max(1, max |b|): relative for large values, absolute near 0.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    assert_eq!(a.kind(), b.kind());
    if b.numel() == 0 {
        return 0.0;
    }
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1.0)
}

fn tolerance(kind: Kind) -> f64 {
    match kind {
        Kind::Double => 1e-12,
        _ => 1e-5,
    }
}

/// Checks every field of `got` against `want` (gradients of weight/bias after summing them over
/// the group, as DDP's averaging would up to the factor), printing the errors for the logs.
fn check_step(pg: &ProcessGroup, what: &str, got: &Step, want: &Step, tol: f64) {
    let sum = |t: &Tensor| {
        let t = t.copy();
        pg.all_reduce_sum(std::slice::from_ref(&t)).unwrap();
        t
    };
    let errs = [
        ("out", rel_err(&got.out, &want.out)),
        ("grad_input", rel_err(&got.grad_x, &want.grad_x)),
        ("sum grad_weight", rel_err(&sum(&got.grad_w), &want.grad_w)),
        ("sum grad_bias", rel_err(&sum(&got.grad_b), &want.grad_b)),
        (
            "running_mean",
            rel_err(&got.running_mean, &want.running_mean),
        ),
        ("running_var", rel_err(&got.running_var, &want.running_var)),
    ];
    eprintln!("rank {} {what}: {errs:?}", pg.rank());
    for (name, err) in errs {
        assert!(
            err <= tol,
            "{what}: {name} off by {err:e} (tolerance {tol:e})"
        );
    }
}

/// Images of each rank: unequal slices of one batch of 5.
fn slice_of(env: &DistEnv) -> (i64, i64) {
    [(0, 3), (3, 2)][env.rank]
}

#[test]
fn sync_bn_two_ranks_match_one_process() {
    run_ranks("sync_bn_two_ranks_match_one_process", 2, |env| {
        let pg = join(env);
        let (start, len) = slice_of(env);
        for kind in [Kind::Float, Kind::Double] {
            for shape in [&[5i64, 3, 4, 3][..], &[5, 4, 7]] {
                let batch = Batch::new(shape, kind);
                let whole = reference(&batch, 0, 5);
                let want = Step {
                    out: whole.out.narrow(0, start, len),
                    grad_x: whole.grad_x.narrow(0, start, len),
                    ..whole
                };
                let got = synced(&pg, &batch, start, len);
                check_step(
                    &pg,
                    &format!("{kind:?} {shape:?}"),
                    &got,
                    &want,
                    tolerance(kind),
                );
            }
        }
    });
}

#[test]
fn sync_bn_empty_rank_still_participates() {
    run_ranks("sync_bn_empty_rank_still_participates", 2, |env| {
        let pg = join(env);
        for kind in [Kind::Float, Kind::Double] {
            // Rank 0 has no images, rank 1 has all 3: BN over rank 1's images alone.
            let batch = Batch::new(&[3, 4, 2, 3], kind);
            let (start, len) = if env.rank == 0 { (0, 0) } else { (0, 3) };
            let whole = reference(&batch, 0, 3);
            let want = Step {
                out: whole.out.narrow(0, start, len),
                grad_x: whole.grad_x.narrow(0, start, len),
                ..whole
            };
            let got = synced(&pg, &batch, start, len);
            check_step(&pg, &format!("{kind:?}"), &got, &want, tolerance(kind));
            if env.rank == 0 {
                assert_eq!(got.out.size(), [0, 4, 2, 3]);
                let zeros = Tensor::zeros([4], (kind, Device::Cpu));
                assert_eq!(got.grad_w, zeros, "no local contribution");
                assert_eq!(got.grad_b, zeros, "no local contribution");
            }

            // Every rank empty: empty outputs, running statistics untouched, backward fine.
            let got = synced(&pg, &batch, 0, 0);
            assert_eq!(got.out.size(), [0, 4, 2, 3]);
            assert_eq!(got.running_mean, batch.running_mean);
            assert_eq!(got.running_var, batch.running_var);
            assert_eq!(got.grad_w, Tensor::zeros([4], (kind, Device::Cpu)));
        }
    });
}

#[test]
fn sync_bn_one_rank_is_plain_batch_norm() {
    run_ranks("sync_bn_one_rank_is_plain_batch_norm", 1, |env| {
        let pg = join(env);
        for kind in [Kind::Float, Kind::Double] {
            let tol = if kind == Kind::Double { 1e-12 } else { 1e-6 };
            for shape in [&[4i64, 3, 5, 2][..], &[6, 3]] {
                let batch = Batch::new(shape, kind);
                let got = synced(&pg, &batch, 0, shape[0]);
                let want = reference(&batch, 0, shape[0]);
                check_step(&pg, &format!("{kind:?} {shape:?}"), &got, &want, tol);
            }

            // Without affine parameters.
            let batch = Batch::new(&[4, 3, 5], kind);
            let x = batch.x.copy().set_requires_grad(true);
            let (rm, rv) = (batch.running_mean.copy(), batch.running_var.copy());
            let out = sync_batch_norm(&pg, &x, None, None, &rm, &rv, MOMENTUM, EPS).unwrap();
            (&out * &batch.g).sum(kind).backward();
            let x_ref = batch.x.copy().set_requires_grad(true);
            let (rm_ref, rv_ref) = (batch.running_mean.copy(), batch.running_var.copy());
            let out_ref = x_ref.batch_norm::<&Tensor>(
                None,
                None,
                Some(&rm_ref),
                Some(&rv_ref),
                true,
                MOMENTUM,
                EPS,
                false,
            );
            (&out_ref * &batch.g).sum(kind).backward();
            assert!(rel_err(&out, &out_ref) <= tol);
            assert!(rel_err(&x.grad(), &x_ref.grad()) <= tol);
            assert!(rel_err(&rm, &rm_ref) <= tol);
            assert!(rel_err(&rv, &rv_ref) <= tol);
        }

        // bfloat16 (as under mixed precision): statistics in float, so as close to plain BN as
        // bfloat16's own rounding of the output allows.
        let batch = Batch::new(&[4, 3, 5, 2], Kind::BFloat16);
        let got = synced(&pg, &batch, 0, 4);
        let want = reference(&batch, 0, 4);
        check_step(&pg, "BFloat16", &got, &want, 2e-2);

        // Mistakes are errors, not crashes.
        let opts = (Kind::Float, Device::Cpu);
        let (rm, rv) = (Tensor::zeros([3], opts), Tensor::ones([3], opts));
        let one_value = Tensor::ones([1, 3], opts);
        let err = sync_batch_norm(&pg, &one_value, None, None, &rm, &rv, MOMENTUM, EPS)
            .expect_err("one value per channel");
        eprintln!("{err}");
        let x = Tensor::randn([2, 3, 4], opts);
        let bad_weight = Tensor::ones([4], opts);
        let err = sync_batch_norm(&pg, &x, Some(&bad_weight), None, &rm, &rv, MOMENTUM, EPS)
            .expect_err("weight of the wrong size");
        eprintln!("{err}");
        let ints = Tensor::ones([2, 3, 4], (Kind::Int64, Device::Cpu));
        assert!(sync_batch_norm(&pg, &ints, None, None, &rm, &rv, MOMENTUM, EPS).is_err());

        // The autograd node holds its own reference to the backend: a backward after the Rust
        // handle is gone touches no freed memory (and with Gloo still completes).
        let batch = Batch::new(&[4, 3, 2], Kind::Float);
        let (x, g, w, b, rm, rv) = leaves(&batch, 0, 4);
        let out = sync_batch_norm(&pg, &x, Some(&w), Some(&b), &rm, &rv, MOMENTUM, EPS).unwrap();
        drop(pg);
        (&out * &g).sum(Kind::Float).f_backward().unwrap();
        let want = reference(&batch, 0, 4);
        assert!(rel_err(&x.grad(), &want.grad_x) <= 1e-6);
    });
}

#[test]
fn sync_bn_backward_with_dead_peer_is_an_error() {
    run_ranks("sync_bn_backward_with_dead_peer_is_an_error", 2, |env| {
        let pg = join(env);
        let batch = Batch::new(&[4, 3, 2], Kind::Float);
        let (x, g, w, b, rm, rv) = leaves(&batch, 2 * env.rank as i64, 2);
        let out = sync_batch_norm(&pg, &x, Some(&w), Some(&b), &rm, &rv, MOMENTUM, EPS).unwrap();
        pg.barrier().unwrap();
        if env.rank == 1 {
            // Gone before backward, as a crashed rank would be.
            std::process::exit(0);
        }
        let err = (&out * &g)
            .sum(Kind::Float)
            .f_backward()
            .expect_err("backward's all-reduce with a dead peer must fail");
        eprintln!("rank 0 got: {err}");
        assert!(matches!(err, tch::TchError::Torch(_)), "{err:?}");
    });
}
