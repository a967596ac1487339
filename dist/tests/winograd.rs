//! The Winograd 3x3 convolution against libtorch's own convolution (`conv2d(x, w, padding=1)`):
//! outputs and both gradients, in double (where F(4x4, 3x3) is exact up to rounding, so any
//! indexing or transform mistake shows) and in float (the accuracy training runs with), over
//! sizes that are and are not multiples of the 4-pixel tile, one pixel wide, and RoI-sized.

use cnx_dist::ops::winograd_conv3x3;
use tch::{Kind, Tensor};

struct Case {
    n: i64,
    c: i64,
    k: i64,
    h: i64,
    w: i64,
}

const CASES: &[Case] = &[
    Case {
        n: 1,
        c: 1,
        k: 1,
        h: 1,
        w: 1,
    },
    Case {
        n: 2,
        c: 3,
        k: 5,
        h: 8,
        w: 8,
    },
    Case {
        n: 2,
        c: 4,
        k: 3,
        h: 7,
        w: 13,
    },
    Case {
        n: 3,
        c: 8,
        k: 6,
        h: 14,
        w: 5,
    },
    Case {
        n: 5,
        c: 16,
        k: 16,
        h: 7,
        w: 7,
    },
    Case {
        n: 1,
        c: 2,
        k: 2,
        h: 33,
        w: 2,
    },
];

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - b).abs().max().double_value(&[]) / scale
}

/// (output, input gradient, weight gradient) of `conv` at a fixed output gradient.
fn run(
    conv: impl Fn(&Tensor, &Tensor) -> Tensor,
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let w = w.detach().set_requires_grad(true);
    let y = conv(&x, &w);
    (&y * gy).sum(y.kind()).backward();
    (y.detach(), x.grad(), w.grad())
}

fn check(kind: Kind, bound: f64) {
    tch::manual_seed(7);
    for case in CASES {
        let Case { n, c, k, h, w } = *case;
        let x = Tensor::randn([n, c, h, w], (kind, tch::Device::Cpu));
        let wt = Tensor::randn([k, c, 3, 3], (kind, tch::Device::Cpu)) / (9.0 * c as f64).sqrt();
        let gy = Tensor::randn([n, k, h, w], (kind, tch::Device::Cpu));
        let direct =
            |x: &Tensor, w: &Tensor| x.conv2d(w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let wino = |x: &Tensor, w: &Tensor| winograd_conv3x3(x, w).unwrap();
        let (y0, gx0, gw0) = run(direct, &x, &wt, &gy);
        let (y1, gx1, gw1) = run(wino, &x, &wt, &gy);
        assert_eq!(y1.size(), y0.size());
        for (what, a, b) in [
            ("output", &y1, &y0),
            ("input grad", &gx1, &gx0),
            ("weight grad", &gw1, &gw0),
        ] {
            let e = rel(a, b);
            assert!(
                e < bound,
                "{kind:?} N={n} C={c} K={k} {h}x{w}: {what} differs from conv2d by {e:.2e} (bound {bound:.0e})"
            );
        }
    }
}

#[test]
fn matches_conv2d_in_double() {
    check(Kind::Double, 1e-12);
}

#[test]
fn matches_conv2d_in_float_to_winograd_accuracy() {
    check(Kind::Float, 5e-5);
}

#[test]
fn non_contiguous_input_and_only_input_gradient() {
    // A channels-last view as input, a weight that needs no gradient (frozen layers).
    tch::manual_seed(3);
    let x = Tensor::randn([2, 6, 10, 9], (Kind::Double, tch::Device::Cpu))
        .permute([0, 2, 3, 1])
        .contiguous()
        .permute([0, 3, 1, 2]);
    assert!(!x.is_contiguous());
    let w = Tensor::randn([4, 6, 3, 3], (Kind::Double, tch::Device::Cpu));
    let xg = x.detach().set_requires_grad(true);
    let y = winograd_conv3x3(&xg, &w).unwrap();
    let y0 = x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
    assert!(rel(&y, &y0) < 1e-12);
    y.sum(Kind::Double).backward();
    let xr = x.detach().set_requires_grad(true);
    xr.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)
        .sum(Kind::Double)
        .backward();
    assert!(rel(&xg.grad(), &xr.grad()) < 1e-12);
}

#[test]
fn rejects_what_it_does_not_compute() {
    let x = Tensor::zeros([1, 4, 8, 8], (Kind::Float, tch::Device::Cpu));
    let error_with = |weight: &[i64], kind: Kind| {
        let w = Tensor::zeros(weight, (kind, tch::Device::Cpu));
        winograd_conv3x3(&x, &w).unwrap_err().to_string()
    };
    let err = error_with(&[2, 4, 5, 5], Kind::Float);
    assert!(err.contains("[K, C, 3, 3]"), "{err}");
    let err = error_with(&[2, 4, 3, 3], Kind::Double);
    assert!(err.contains("one dtype"), "{err}");
}

#[test]
fn many_channels_span_several_gemm_chunks() {
    // Input and output channels beyond the 64-channel GEMM chunks of the plane-by-plane path
    // (planes above 32x32), not multiples of it.
    tch::manual_seed(11);
    let x = Tensor::randn([2, 70, 36, 30], (Kind::Double, tch::Device::Cpu));
    let w = Tensor::randn([130, 70, 3, 3], (Kind::Double, tch::Device::Cpu));
    let gy = Tensor::randn([2, 130, 36, 30], (Kind::Double, tch::Device::Cpu));
    let direct = |x: &Tensor, w: &Tensor| x.conv2d(w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
    let (y0, gx0, gw0) = run(direct, &x, &w, &gy);
    let (y1, gx1, gw1) = run(|x, w| winograd_conv3x3(x, w).unwrap(), &x, &w, &gy);
    assert!(rel(&y1, &y0) < 1e-12);
    assert!(rel(&gx1, &gx0) < 1e-12);
    assert!(rel(&gw1, &gw0) < 1e-12);
}

#[test]
fn used_only_where_it_pays() {
    use cnx_dist::ops::{winograd_pays, winograd_where_it_pays};
    let cpu = |s: &[i64]| Tensor::zeros(s, (Kind::Float, tch::Device::Cpu));
    assert!(winograd_pays(
        &cpu(&[2, 256, 64, 64]),
        &cpu(&[256, 256, 3, 3])
    ));
    // RoI features: many small planes.
    assert!(winograd_pays(
        &cpu(&[512, 256, 7, 7]),
        &cpu(&[256, 256, 3, 3])
    ));
    assert!(!winograd_pays(
        &cpu(&[2, 256, 25, 34]),
        &cpu(&[256, 256, 3, 3])
    ));
    // UperNet's PSP bottleneck at 1/32 scale.
    assert!(!winograd_pays(
        &cpu(&[2, 2816, 16, 16]),
        &cpu(&[512, 2816, 3, 3])
    ));
    assert!(!winograd_pays(
        &cpu(&[2, 64, 128, 128]),
        &cpu(&[64, 64, 3, 3])
    ));
    let half = Tensor::zeros([2, 256, 64, 64], (Kind::BFloat16, tch::Device::Cpu));
    assert!(!winograd_pays(&half, &cpu(&[256, 256, 3, 3])));
    assert!(winograd_where_it_pays(&cpu(&[1, 256, 16, 16]), &cpu(&[256, 256, 3, 3])).is_none());
    let y = winograd_where_it_pays(&cpu(&[1, 256, 64, 64]), &cpu(&[256, 256, 3, 3])).unwrap();
    assert_eq!(y.size(), [1, 256, 64, 64]);
}
