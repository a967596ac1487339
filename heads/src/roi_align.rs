//! RoIAlign (torchvision / mmcv semantics: `aligned` half-pixel offset, adaptive sampling ratio)
//! built from tensor ops so autograd provides the gradient with respect to the features.
//!
//! Bilinear sampling and bin averaging are separable in y and x, so each RoI's output is
//! `Wy · F_window · Wxᵀ`, where `F_window` is the feature window the RoI's samples touch
//! (gathered with one `index_select` on an N·H·W × C view) and `Wy` (P × Kh), `Wx` (P × Kw) hold
//! the summed bilinear weights of each bin's samples divided by the per-RoI sample count. The
//! adaptive count `ceil(roi_size / P)` varies per RoI: samples are padded to the largest count
//! and masked (weight 0), so the result is exact, not an approximation. RoIs are processed in
//! chunks sorted by window size so the padding stays small and memory bounded.

use tch::{Kind, Tensor};

/// Settings of one RoIAlign layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoiAlign {
    pub output_size: (i64, i64),
    pub spatial_scale: f64,
    /// Samples per bin per axis; 0 = adaptive `ceil(roi_size / output_size)`.
    pub sampling_ratio: i64,
    pub aligned: bool,
}

impl RoiAlign {
    pub fn new(output_size: i64, spatial_scale: f64, sampling_ratio: i64, aligned: bool) -> Self {
        Self {
            output_size: (output_size, output_size),
            spatial_scale,
            sampling_ratio,
            aligned,
        }
    }

    pub fn forward(&self, feat: &Tensor, rois: &Tensor) -> Tensor {
        roi_align(
            feat,
            rois,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
        )
    }
}

/// Per-axis sampling data for all RoIs: low/high indices and weights of every sample.
struct Axis {
    low: Tensor,  // (R, P, G) int64
    high: Tensor, // (R, P, G) int64
    w_low: Tensor,
    w_high: Tensor,
    start: Tensor, // (R) int64 window start
    extent: Vec<i64>,
}

/// Sampling along one axis. `start`, `size` are (R) float RoI start and length in feature
/// pixels; `len` the feature size along the axis.
fn axis(start: &Tensor, size: &Tensor, p: i64, sr: i64, len: i64) -> Axis {
    let device = start.device();
    let bin = size / p as f64;
    let grid = if sr > 0 {
        Tensor::full_like(&bin, sr as f64).to_kind(Kind::Int64)
    } else {
        bin.ceil().to_kind(Kind::Int64)
    };
    let grid = grid.clamp_min(0);
    let gmax = if sr > 0 {
        sr
    } else {
        grid.max().int64_value(&[]).max(1)
    };
    let gf = grid.clamp_min(1).to_kind(Kind::Float);
    let ph = Tensor::arange(p, (Kind::Float, device)).view([1, p, 1]);
    let iy = Tensor::arange(gmax, (Kind::Float, device)).view([1, 1, gmax]);
    let bin3 = bin.view([-1, 1, 1]);
    let g3 = gf.view([-1, 1, 1]);
    // Same evaluation order as torchvision: (start + ph * bin) + ((iy + .5) * bin) / grid.
    let y = (start.view([-1, 1, 1]) + &ph * &bin3) + ((&iy + 0.5) * &bin3) / &g3;
    let in_grid = iy.to_kind(Kind::Int64).lt_tensor(&grid.view([-1, 1, 1]));
    let valid = y
        .ge(-1.0)
        .logical_and(&y.le(len as f64))
        .logical_and(&in_grid);
    let yc = y.clamp_min(0.0);
    let low0 = yc.floor().to_kind(Kind::Int64);
    let at_end = low0.ge(len - 1);
    let low = low0.clamp_max(len - 1);
    let high = (&low0 + 1).clamp_max(len - 1);
    let yc = yc.where_self(&at_end.logical_not(), &low.to_kind(Kind::Float));
    let ly = &yc - low.to_kind(Kind::Float);
    let hy = 1.0 - &ly;
    let m = valid.to_kind(Kind::Float) / &g3;
    let w_low = hy * &m;
    let w_high = ly * &m;
    let big = i64::MAX / 4;
    let s = low
        .where_self(&valid, &Tensor::full_like(&low, big))
        .amin([1, 2], false);
    let e = high
        .where_self(&valid, &Tensor::full_like(&high, -1))
        .amax([1, 2], false);
    let any = e.ge(0);
    let s = s.where_self(&any, &Tensor::zeros_like(&s));
    let ext = (&e - &s + 1).clamp_min(1);
    let extent = crate::boxes::to_vec_i64(&ext);
    Axis {
        low,
        high,
        w_low,
        w_high,
        start: s,
        extent,
    }
}

/// Dense weights (r, P, K) of a chunk of RoIs from their sample indices and weights.
fn dense_weights(a: &Axis, idx: &Tensor, p: i64, k: i64) -> Tensor {
    let s = a.start.index_select(0, idx).view([-1, 1, 1]);
    let low = a.low.index_select(0, idx);
    let high = a.high.index_select(0, idx);
    let wl = a.w_low.index_select(0, idx);
    let wh = a.w_high.index_select(0, idx);
    let r = idx.size()[0];
    let z = Tensor::zeros([r, p, k], (wl.kind(), wl.device()));
    let il = (low - &s).clamp(0, k - 1);
    let ih = (high - &s).clamp(0, k - 1);
    z.scatter_add(2, &il, &wl).scatter_add(2, &ih, &wh)
}

/// RoIAlign of `feat` (N,C,H,W) over `rois` (R,5: batch index, x1, y1, x2, y2) → (R,C,Ph,Pw).
/// Gradients flow to `feat` (not to the RoI coordinates, as in torchvision).
///
/// Computed in fp32 whatever the input precision and with autocast off inside (torchvision's
/// autocast wrapper of `roi_align` and mmdet's `force_fp32` RoI extractor do the same): the
/// sampling weights and the bin averages need the precision, and autocast would otherwise run the
/// window products (`bmm`/`matmul`) in fp16/bf16. The result has `feat`'s dtype, as there.
pub fn roi_align(
    feat: &Tensor,
    rois: &Tensor,
    out: (i64, i64),
    scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    cnx_backbone::autocast::without_autocast(|| {
        let x = cnx_backbone::autocast::upcast(feat);
        roi_align_impl(&x, rois, out, scale, sampling_ratio, aligned).to_kind(feat.kind())
    })
}

fn roi_align_impl(
    feat: &Tensor,
    rois: &Tensor,
    out: (i64, i64),
    scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let (n, c, h, w) = feat.size4().expect("N,C,H,W features");
    let r = rois.size()[0];
    let device = feat.device();
    if r == 0 {
        return Tensor::zeros([0, c, out.0, out.1], (feat.kind(), device));
    }
    let rois = rois.detach().to_kind(Kind::Float);
    let offset = if aligned { 0.5 } else { 0.0 };
    let sw = rois.select(1, 1) * scale - offset;
    let sh = rois.select(1, 2) * scale - offset;
    let mut rw = rois.select(1, 3) * scale - offset - &sw;
    let mut rh = rois.select(1, 4) * scale - offset - &sh;
    if !aligned {
        rw = rw.clamp_min(1.0);
        rh = rh.clamp_min(1.0);
    }
    let ay = axis(&sh, &rh, out.0, sampling_ratio, h);
    let ax = axis(&sw, &rw, out.1, sampling_ratio, w);
    let bidx = rois.select(1, 0).to_kind(Kind::Int64);
    let flat = feat.permute([0, 2, 3, 1]).contiguous().view([n * h * w, c]);
    // fp32 (or fp64 when the caller asked for it): reduced precision was upcast by the caller.
    let compute = feat.kind();

    // Chunks of RoIs with similar windows; memory per chunk bounded by ~16M gathered values.
    let mut order: Vec<usize> = (0..r as usize).collect();
    order.sort_by_key(|&i| ay.extent[i] * ax.extent[i]);
    let budget: i64 = 1 << 24;
    let mut outs: Vec<Tensor> = Vec::new();
    let mut perm: Vec<i64> = Vec::with_capacity(r as usize);
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        let (mut kh, mut kw) = (1, 1);
        while j < order.len() {
            let (nh, nw) = (kh.max(ay.extent[order[j]]), kw.max(ax.extent[order[j]]));
            if j > i && ((j - i + 1) as i64) * nh * nw * c > budget {
                break;
            }
            kh = nh;
            kw = nw;
            j += 1;
        }
        let ids: Vec<i64> = order[i..j].iter().map(|&k| k as i64).collect();
        perm.extend(&ids);
        let idx = Tensor::from_slice(&ids).to_device(device);
        let m = ids.len() as i64;
        let wy = dense_weights(&ay, &idx, out.0, kh).to_kind(compute);
        let wx = dense_weights(&ax, &idx, out.1, kw).to_kind(compute);
        let rows = (ay.start.index_select(0, &idx).view([-1, 1])
            + Tensor::arange(kh, (Kind::Int64, device)).view([1, -1]))
        .clamp_max(h - 1);
        let cols = (ax.start.index_select(0, &idx).view([-1, 1])
            + Tensor::arange(kw, (Kind::Int64, device)).view([1, -1]))
        .clamp_max(w - 1);
        let b = bidx.index_select(0, &idx).view([-1, 1, 1]);
        let flat_idx = b * (h * w) + rows.view([m, kh, 1]) * w + cols.view([m, 1, kw]);
        let fi = flat_idx.view([-1, 1]).expand([m * kh * kw, c], false);
        let win = flat
            .gather(0, &fi, false)
            .view([m, kh, kw * c])
            .to_kind(compute);
        let t1 = wy.bmm(&win).view([m, out.0, kw, c]);
        let o = wx.unsqueeze(1).matmul(&t1); // (m, Ph, Pw, C)
        outs.push(o.permute([0, 3, 1, 2]));
        i = j;
    }
    let cat = Tensor::cat(&outs, 0);
    let perm = Tensor::from_slice(&perm).to_device(device);
    let inv = perm.argsort(0, false);
    cat.index_select(0, &inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_map_gives_constant_inside() {
        let f = Tensor::ones([1, 2, 16, 16], (Kind::Float, tch::Device::Cpu));
        let rois = Tensor::from_slice(&[0f32, 2., 2., 10., 12.]).view([1, 5]);
        let o = roi_align(&f, &rois, (7, 7), 1.0, 0, true);
        assert_eq!(o.size(), vec![1, 2, 7, 7]);
        let v = crate::boxes::to_vec_f32(&o);
        assert!(v.iter().all(|x| (x - 1.0).abs() < 1e-6));
    }

    /// Under (CPU) autocast with bf16 features the result equals the fp32 computation on the
    /// same (bf16-representable) values, rounded once to bf16: the products ran in fp32 and
    /// autocast did not reach inside. Without the fp32 island the bf16 window products differ.
    #[test]
    fn computes_in_fp32_under_autocast() {
        use cnx_backbone::autocast::{with_autocast, DeviceType};
        tch::manual_seed(0);
        let f32_feat = Tensor::randn([2, 16, 24, 20], (Kind::Float, tch::Device::Cpu)) * 3.0;
        let bf = f32_feat.to_kind(Kind::BFloat16);
        let exact_in = bf.to_kind(Kind::Float);
        let rois = Tensor::from_slice(&[
            0f32, 1.3, 2.2, 17.9, 20.4, 1., 0.5, 0.5, 9.7, 6.1, 1., 3., 4., 19.5, 23.0, 0., 5.5,
            5.5, 6.0, 7.25,
        ])
        .view([4, 5]);
        let want = roi_align(&exact_in, &rois, (7, 7), 1.0, 0, true);
        let got = with_autocast(DeviceType::Cpu, true, || {
            roi_align(&bf, &rois, (7, 7), 1.0, 0, true)
        });
        assert_eq!(got.kind(), Kind::BFloat16);
        let d = (got.to_kind(Kind::Float) - want.to_kind(Kind::BFloat16).to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(d, 0.0, "bf16 result differs from fp32-then-round by {d}");
        // fp32 input under autocast: fp32 output, identical to no autocast.
        let got32 = with_autocast(DeviceType::Cpu, true, || {
            roi_align(&exact_in, &rois, (7, 7), 1.0, 0, true)
        });
        assert_eq!(got32.kind(), Kind::Float);
        assert_eq!((&got32 - &want).abs().max().double_value(&[]), 0.0);
    }
}
