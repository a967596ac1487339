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
//!
//! [`roi_align_levels`] pools every RoI from its own feature level in one call (the FPN RoI
//! extractor): the chunk plan of all levels comes from one host read of the RoIs' levels and
//! window extents, and the chunks are slices of a device-side sort, so nothing is uploaded.

use crate::sync_count;
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
    ext: Tensor,   // (R) int64 window extent
}

/// Sampling along one axis. `start`, `size` are (R) float RoI start and length in feature
/// pixels; `len` (R) int64 the feature size along the axis at each RoI's level; `gmax` the
/// padded number of samples per bin (at least every RoI's own count).
fn axis(start: &Tensor, size: &Tensor, p: i64, sr: i64, len: &Tensor, gmax: i64) -> Axis {
    let device = start.device();
    let bin = size / p as f64;
    let grid = bin_grid(&bin, sr);
    let gf = grid.clamp_min(1).to_kind(Kind::Float);
    let ph = Tensor::arange(p, (Kind::Float, device)).view([1, p, 1]);
    let iy = Tensor::arange(gmax, (Kind::Float, device)).view([1, 1, gmax]);
    let bin3 = bin.view([-1, 1, 1]);
    let g3 = gf.view([-1, 1, 1]);
    let len3 = len.view([-1, 1, 1]);
    // Same evaluation order as torchvision: (start + ph * bin) + ((iy + .5) * bin) / grid.
    let y = (start.view([-1, 1, 1]) + &ph * &bin3) + ((&iy + 0.5) * &bin3) / &g3;
    let in_grid = iy.to_kind(Kind::Int64).lt_tensor(&grid.view([-1, 1, 1]));
    let valid = y
        .ge(-1.0)
        .logical_and(&y.le_tensor(&len3))
        .logical_and(&in_grid);
    let yc = y.clamp_min(0.0);
    let low0 = yc.floor().to_kind(Kind::Int64);
    let last = &len3 - 1;
    let at_end = low0.ge_tensor(&last);
    let low = low0.minimum(&last);
    let high = (&low0 + 1).minimum(&last);
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
    Axis {
        low,
        high,
        w_low,
        w_high,
        start: s,
        ext,
    }
}

/// Samples per bin of each RoI along one axis: `sr`, or adaptive `ceil(bin)`.
fn bin_grid(bin: &Tensor, sr: i64) -> Tensor {
    let grid = if sr > 0 {
        Tensor::full_like(bin, sr as f64).to_kind(Kind::Int64)
    } else {
        bin.ceil().to_kind(Kind::Int64)
    };
    grid.clamp_min(0)
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
    let levels = Tensor::zeros([rois.size()[0]], (Kind::Int64, rois.device()));
    roi_align_levels(
        &[feat],
        &[scale],
        rois,
        &levels,
        out,
        sampling_ratio,
        aligned,
    )
}

/// RoIAlign of each RoI from its own level: `levels` (R) int64 picks `feats[l]` (spatial scale
/// `scales[l]`); RoIs with a level outside `0..feats.len()` get zeros (mmdet's extractor leaves
/// them so). Per RoI the result equals [`roi_align`] on its level, bit for bit; the whole batch
/// costs at most two host reads (the largest adaptive sample count, then every RoI's level and
/// window extents, from which the chunks are planned) and no uploads.
pub fn roi_align_levels(
    feats: &[&Tensor],
    scales: &[f64],
    rois: &Tensor,
    levels: &Tensor,
    out: (i64, i64),
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    cnx_backbone::autocast::without_autocast(|| {
        let x: Vec<Tensor> = feats
            .iter()
            .map(|f| cnx_backbone::autocast::upcast(f))
            .collect();
        roi_align_impl(&x, scales, rois, levels, out, sampling_ratio, aligned)
            .to_kind(feats[0].kind())
    })
}

fn roi_align_impl(
    feats: &[Tensor],
    scales: &[f64],
    rois: &Tensor,
    levels: &Tensor,
    out: (i64, i64),
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let nl = feats.len() as i64;
    let c = feats[0].size()[1];
    let r = rois.size()[0];
    let device = feats[0].device();
    if r == 0 {
        return Tensor::zeros([0, c, out.0, out.1], (feats[0].kind(), device));
    }
    let rois = rois.detach().to_kind(Kind::Float);
    let valid = levels.ge(0).logical_and(&levels.lt(nl));
    let key = levels.where_self(&valid, &Tensor::full_like(levels, nl));
    let lv = levels.where_self(&valid, &Tensor::zeros_like(levels));
    let sizes: Vec<Vec<i64>> = feats.iter().map(|f| f.size()).collect();
    // Per-RoI scale and feature size. One level: scalars (the single-level op as it was);
    // several: small per-level tables (cached constants) gathered by level.
    let (scale_r, h_r, w_r) = if nl == 1 {
        let full = |v: i64| Tensor::full([r], v, (Kind::Int64, device));
        (None, full(sizes[0][2]), full(sizes[0][3]))
    } else {
        let table = |v: Vec<f64>, kind| sync_count::constant(&v, kind, device).index_select(0, &lv);
        (
            Some(table(scales.to_vec(), Kind::Float)),
            table(sizes.iter().map(|s| s[2] as f64).collect(), Kind::Int64),
            table(sizes.iter().map(|s| s[3] as f64).collect(), Kind::Int64),
        )
    };
    let scaled = |col: i64| match &scale_r {
        None => rois.select(1, col) * scales[0],
        Some(s) => rois.select(1, col) * s,
    };
    let offset = if aligned { 0.5 } else { 0.0 };
    let sw = scaled(1) - offset;
    let sh = scaled(2) - offset;
    let mut rw = scaled(3) - offset - &sw;
    let mut rh = scaled(4) - offset - &sh;
    if !aligned {
        rw = rw.clamp_min(1.0);
        rh = rh.clamp_min(1.0);
    }
    // Samples per bin are padded to the largest count over the batch (zero weights beyond a
    // RoI's own count), so one read serves every level.
    let (gy, gx) = if sampling_ratio > 0 {
        (sampling_ratio, sampling_ratio)
    } else {
        let gmax = |t: &Tensor, p: i64| {
            bin_grid(&(t / p as f64), 0)
                .where_self(&valid, &Tensor::zeros([r], (Kind::Int64, device)))
                .max()
                .view([1])
        };
        sync_count::host_read("roi_align sample counts");
        let g = crate::boxes::to_vec_i64(&Tensor::cat(&[gmax(&rh, out.0), gmax(&rw, out.1)], 0));
        (g[0].max(1), g[1].max(1))
    };
    let ay = axis(&sh, &rh, out.0, sampling_ratio, &h_r, gy);
    let ax = axis(&sw, &rw, out.1, sampling_ratio, &w_r, gx);
    let bidx = rois.select(1, 0).to_kind(Kind::Int64);
    let flats: Vec<Tensor> = feats
        .iter()
        .map(|f| {
            let s = f.size();
            f.permute([0, 2, 3, 1])
                .contiguous()
                .view([s[0] * s[2] * s[3], c])
        })
        .collect();
    // fp32 (or fp64 when the caller asked for it): reduced precision was upcast by the caller.
    let compute = feats[0].kind();

    // Chunks of RoIs of one level with similar windows (sorted by window size, stable), memory
    // per chunk bounded by ~16M gathered values. The same order is built on the device from
    // the same keys, so the chunks are slices of it and nothing is uploaded.
    let area = ay.ext.clamp_max(1 << 20) * ax.ext.clamp_max(1 << 20);
    sync_count::host_read("roi_align levels and extents");
    let host = crate::boxes::to_vec_i64(&Tensor::cat(&[&key, &ay.ext, &ax.ext], 0));
    let ru = r as usize;
    let (hkey, ey, ex) = (&host[..ru], &host[ru..2 * ru], &host[2 * ru..]);
    let mut order: Vec<usize> = (0..ru).collect();
    order.sort_by_key(|&i| (hkey[i], ey[i].min(1 << 20) * ex[i].min(1 << 20)));
    let dev_order = (&key * (1i64 << 42) + &area).argsort_stable(true, 0, false);
    let n_valid = order.iter().take_while(|&&i| hkey[i] < nl).count();
    let budget: i64 = 1 << 24;
    let mut outs: Vec<Tensor> = Vec::new();
    let mut i = 0;
    while i < n_valid {
        let l = hkey[order[i]];
        let (h, w) = (sizes[l as usize][2], sizes[l as usize][3]);
        let mut j = i;
        let (mut kh, mut kw) = (1, 1);
        while j < n_valid && hkey[order[j]] == l {
            let (nh, nw) = (kh.max(ey[order[j]]), kw.max(ex[order[j]]));
            if j > i && ((j - i + 1) as i64) * nh * nw * c > budget {
                break;
            }
            kh = nh;
            kw = nw;
            j += 1;
        }
        let idx = dev_order.slice(0, i as i64, j as i64, 1);
        let m = (j - i) as i64;
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
        let win = flats[l as usize]
            .gather(0, &fi, false)
            .view([m, kh, kw * c])
            .to_kind(compute);
        let t1 = wy.bmm(&win).view([m, out.0, kw, c]);
        let o = wx.unsqueeze(1).matmul(&t1); // (m, Ph, Pw, C)
        outs.push(o.permute([0, 3, 1, 2]));
        i = j;
    }
    let zeros = Tensor::zeros([r, c, out.0, out.1], (compute, device));
    if outs.is_empty() {
        return zeros;
    }
    let cat = Tensor::cat(&outs, 0);
    zeros.index_copy(0, &dev_order.slice(0, 0, n_valid as i64, 1), &cat)
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
