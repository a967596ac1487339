//! Non-maximum suppression with the arithmetic and tie order of `torchvision.ops.nms` (stable
//! descending sort by score, suppress when IoU > threshold), plus batched NMS per class / level
//! id with the coordinate-offset trick that torchvision and mmcv use, and mmcv's per-id
//! variant for very large inputs.
//!
//! Two implementations give the same kept indices in the same order:
//! - on the host, a greedy loop over the score-sorted boxes (fastest on CPU, where reading the
//!   boxes costs nothing);
//! - on the device ([`nms_device`], used for CUDA tensors or under
//!   [`crate::sync_count::with_device_paths`]): the suppression relation "i suppresses j" (j
//!   after i in score order, IoU > threshold, same id where ids apply) is computed as a bit
//!   matrix in row chunks, packed into 64-bit words on the device and read once; the greedy
//!   pass over those bits on the host is O(K²/64) word operations, and the kept positions go
//!   back with one non-blocking copy.

use crate::sync_count;
use tch::{Device, Kind, Tensor};

/// mmcv's `split_thr`: from this many candidates on, mmcv runs NMS per id.
pub const SPLIT_THR: i64 = 10000;

/// Indices (into `boxes`) kept by NMS over `boxes` (N,4) `x1,y1,x2,y2` with `scores` (N),
/// in decreasing score order. Identical to `torchvision.ops.nms`.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Tensor {
    let device = boxes.device();
    let n = boxes.size()[0];
    if n == 0 {
        return Tensor::zeros([0], (Kind::Int64, device));
    }
    if sync_count::device_paths(device) {
        return nms_device(boxes, scores, None, iou_threshold);
    }
    let order = scores.to_kind(Kind::Float).argsort_stable(true, 0, true);
    let b = boxes
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    sync_count::host_read("nms boxes");
    sync_count::host_read("nms order");
    let order_v = crate::boxes::to_vec_i64(&order);
    let bv = Vec::<f32>::try_from(&b.view([-1])).expect("f32 boxes");
    let keep = nms_sorted(&bv, &order_v, iou_threshold as f32);
    sync_count::upload_i64(&keep, device, "nms keep")
}

/// Rows × columns of IoU evaluated per chunk of the device NMS (bounds its temporaries to a
/// few hundred MB of fp32 at worst).
const CHUNK_BUDGET: i64 = 1 << 24;

/// NMS on the tensors' device (see the module docs): the same result as the host loop of
/// [`nms`] over `boxes` / `scores`, or, with `ids`, the same as NMS run separately on each id's
/// boxes with the kept indices merged in decreasing score order (ties: lower index first), as
/// mmcv's per-id path returns them. Boxes are compared in fp32, as the host loop does.
///
/// Host traffic: one read of the packed suppression bits (plus one read of the grouped ids when
/// `ids` are given) and one non-blocking upload of the kept positions.
pub fn nms_device(
    boxes: &Tensor,
    scores: &Tensor,
    ids: Option<&Tensor>,
    iou_threshold: f64,
) -> Tensor {
    let device = boxes.device();
    let k = boxes.size()[0];
    if k == 0 {
        return Tensor::zeros([0], (Kind::Int64, device));
    }
    let mut order = scores.to_kind(Kind::Float).argsort_stable(true, 0, true);
    // Segment ends: row i can only suppress columns in (i, seg_end(i)). Without ids that is
    // everything after it; with ids the boxes are grouped by id (score order kept inside a
    // group) and a row only reaches the end of its group.
    let mut seg_ends: Vec<i64> = vec![k];
    let mut sorted_ids = None;
    if let Some(ids) = ids {
        let by_id = ids.index_select(0, &order);
        let regroup = by_id.argsort_stable(true, 0, false);
        order = order.index_select(0, &regroup);
        let grouped = by_id.index_select(0, &regroup);
        // The grouped ids themselves (K values) are read: the group ends follow on the host,
        // with one sync (`unique_consecutive` would sync for its size, then again to read).
        sync_count::host_read("nms grouped ids");
        let g = crate::boxes::to_vec_i64(&grouped);
        seg_ends = (1..g.len())
            .filter(|&i| g[i] != g[i - 1])
            .map(|i| i as i64)
            .chain([k])
            .collect();
        sorted_ids = Some(grouped);
    }
    let b = boxes.to_kind(Kind::Float).index_select(0, &order);
    // The threshold rounded to f32 as the host loop compares it (exact in either precision).
    let thr = iou_threshold as f32 as f64;
    let (x1, y1, x2, y2) = (
        b.select(1, 0),
        b.select(1, 1),
        b.select(1, 2),
        b.select(1, 3),
    );
    let area = (&x2 - &x1) * (&y2 - &y1);
    let pow2 = Tensor::ones([64], (Kind::Int64, device))
        .bitwise_left_shift(&Tensor::arange(64, (Kind::Int64, device)));
    let end_of = |i: i64| -> i64 {
        let s = seg_ends.partition_point(|&e| e <= i);
        seg_ends[s]
    };
    // Plan row chunks [r0, r1) over columns [c0, c1): c0 is r0 rounded down to a word, c1 the
    // end of the last row's segment (segments are contiguous, so the furthest).
    struct Chunk {
        r0: i64,
        r1: i64,
        w0: usize,
        wc: usize,
    }
    let mut chunks = Vec::new();
    let mut r0 = 0;
    while r0 < k {
        let c0 = r0 / 64 * 64;
        let mut r1 = r0 + 1;
        while r1 < k && (r1 + 1 - r0) * (end_of(r1) - c0) <= CHUNK_BUDGET {
            r1 += 1;
        }
        let c1 = end_of(r1 - 1);
        chunks.push(Chunk {
            r0,
            r1,
            w0: (c0 / 64) as usize,
            wc: ((c1 - c0 + 63) / 64) as usize,
        });
        r0 = r1;
    }
    let mut packed = Vec::with_capacity(chunks.len());
    for ch in &chunks {
        let c0 = ch.w0 as i64 * 64;
        let c1 = (c0 + ch.wc as i64 * 64).min(k);
        let rows = |t: &Tensor| t.slice(0, ch.r0, ch.r1, 1).unsqueeze(1);
        let cols = |t: &Tensor| t.slice(0, c0, c1, 1).unsqueeze(0);
        // The host loop's expressions: max/min corners, clamped extents, inter / (a + b - inter).
        let w = (rows(&x2).minimum(&cols(&x2)) - rows(&x1).maximum(&cols(&x1))).clamp_min(0.0);
        let h = (rows(&y2).minimum(&cols(&y2)) - rows(&y1).maximum(&cols(&y1))).clamp_min(0.0);
        let inter = w * h;
        let ovr = &inter / (rows(&area) + cols(&area) - &inter);
        let ri = Tensor::arange_start(ch.r0, ch.r1, (Kind::Int64, device)).unsqueeze(1);
        let ci = Tensor::arange_start(c0, c1, (Kind::Int64, device)).unsqueeze(0);
        let mut sup = ovr.gt(thr).logical_and(&ci.gt_tensor(&ri));
        if let Some(g) = &sorted_ids {
            sup = sup.logical_and(&rows(g).eq_tensor(&cols(g)));
        }
        let pad = ch.wc as i64 * 64 - (c1 - c0);
        let sup = sup.constant_pad_nd([0, pad]).to_kind(Kind::Int64);
        let words = (sup.view([ch.r1 - ch.r0, ch.wc as i64, 64]) * &pow2).sum_dim_intlist(
            -1,
            false,
            Kind::Int64,
        );
        packed.push(words.view([-1]));
    }
    sync_count::host_read("nms suppression bits");
    let bits = crate::boxes::to_vec_i64(&Tensor::cat(&packed, 0));
    // Greedy pass: a box is kept unless an earlier kept box suppresses it.
    let mut removed = vec![0u64; ((k + 63) / 64) as usize];
    let mut kept = Vec::new();
    let mut off = 0usize;
    for ch in &chunks {
        for i in ch.r0..ch.r1 {
            let (wi, bi) = ((i / 64) as usize, i % 64);
            if (removed[wi] >> bi) & 1 == 0 {
                kept.push(i);
                let row = &bits[off + (i - ch.r0) as usize * ch.wc..][..ch.wc];
                for (r, &b) in removed[ch.w0..ch.w0 + ch.wc].iter_mut().zip(row) {
                    *r |= b as u64;
                }
            }
        }
        off += (ch.r1 - ch.r0) as usize * ch.wc;
    }
    let pos = sync_count::upload_i64(&kept, device, "nms keep");
    let keep = order.index_select(0, &pos);
    if ids.is_none() {
        return keep;
    }
    // Per-id results merged as mmcv does: ascending index, then a stable sort by score.
    let keep = keep.sort(0, false).0;
    let by_score = scores.index_select(0, &keep).argsort_stable(true, 0, true);
    keep.index_select(0, &by_score)
}

/// The NMS loop over boxes given as a flat `[x1,y1,x2,y2]*` buffer, visiting `order`.
/// Returns kept indices in visit order.
pub fn nms_sorted(b: &[f32], order: &[i64], thr: f32) -> Vec<i64> {
    let n = b.len() / 4;
    let areas: Vec<f32> = (0..n)
        .map(|i| (b[4 * i + 2] - b[4 * i]) * (b[4 * i + 3] - b[4 * i + 1]))
        .collect();
    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();
    for (oi, &i) in order.iter().enumerate() {
        let i = i as usize;
        if suppressed[i] {
            continue;
        }
        keep.push(i as i64);
        let (ix1, iy1, ix2, iy2, iarea) =
            (b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3], areas[i]);
        for &j in &order[oi + 1..] {
            let j = j as usize;
            if suppressed[j] {
                continue;
            }
            let xx1 = ix1.max(b[4 * j]);
            let yy1 = iy1.max(b[4 * j + 1]);
            let xx2 = ix2.min(b[4 * j + 2]);
            let yy2 = iy2.min(b[4 * j + 3]);
            let w = (xx2 - xx1).max(0.0);
            let h = (yy2 - yy1).max(0.0);
            let inter = w * h;
            let ovr = inter / (iarea + areas[j] - inter);
            if ovr > thr {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// NMS independently per id (class or level) in one pass, as `torchvision.ops.batched_nms`
/// (coordinate trick: boxes of id k are shifted by k * (max coordinate + 1)) and as mmcv's
/// `batched_nms` below its split threshold. Returns kept indices in decreasing score order.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou_threshold: f64) -> Tensor {
    if boxes.size()[0] == 0 {
        return Tensor::zeros([0], (Kind::Int64, boxes.device()));
    }
    let max_coordinate = boxes.max();
    let offsets = idxs.to_kind(boxes.kind()) * (max_coordinate + 1.0);
    let shifted = boxes + offsets.unsqueeze(1);
    nms(&shifted, scores, iou_threshold)
}

/// mmcv's `batched_nms` (class_agnostic false, `split_thr` 10000): the offset trick below
/// the threshold, an explicit per-id loop (results re-sorted by score) above it.
pub fn mmcv_batched_nms(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: &Tensor,
    iou_threshold: f64,
) -> Tensor {
    let n = boxes.size()[0];
    if n < SPLIT_THR {
        return batched_nms(boxes, scores, idxs, iou_threshold);
    }
    if sync_count::device_paths(boxes.device()) {
        // mmcv computes the shifted boxes before splitting by id; the per-id split is the
        // same-id restriction of the suppression matrix.
        let max_coordinate = boxes.max();
        let shifted = boxes + (idxs.to_kind(boxes.kind()) * (max_coordinate + 1.0)).unsqueeze(1);
        return nms_device(&shifted, scores, Some(idxs), iou_threshold);
    }
    // Per-id loop: offsets are still applied (mmcv computes boxes_for_nms before splitting).
    let max_coordinate = boxes.max();
    let shifted = boxes + (idxs.to_kind(boxes.kind()) * (max_coordinate + 1.0)).unsqueeze(1);
    sync_count::host_read("nms ids");
    let ids = crate::boxes::to_vec_i64(&idxs.unique_dim(0, true, false, false).0);
    let mut kept: Vec<Tensor> = Vec::new();
    for id in ids {
        let mask = idxs.eq(id).nonzero().view([-1]);
        sync_count::host_read("nms id nonzero");
        let k = nms(
            &shifted.index_select(0, &mask),
            &scores.index_select(0, &mask),
            iou_threshold,
        );
        kept.push(mask.index_select(0, &k));
    }
    let keep = Tensor::cat(&kept, 0);
    // mmcv: keep = total_mask.nonzero() (ascending index), then sort by score descending.
    let keep = keep.sort(0, false).0;
    let order = scores.index_select(0, &keep).argsort_stable(true, 0, true);
    keep.index_select(0, &order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suppresses_overlaps_keeps_ties_in_index_order() {
        let b = Tensor::from_slice(&[
            0f32, 0., 10., 10., 1., 1., 10., 10., 50., 50., 60., 60., 0., 0., 10., 10.,
        ])
        .view([4, 4]);
        let s = Tensor::from_slice(&[0.9f32, 0.8, 0.9, 0.9]);
        let k = crate::boxes::to_vec_i64(&nms(&b, &s, 0.5));
        assert_eq!(k, vec![0, 2]);
        let ids = Tensor::from_slice(&[0i64, 1, 0, 1]);
        let k = crate::boxes::to_vec_i64(&batched_nms(&b, &s, &ids, 0.5));
        assert_eq!(k, vec![0, 2, 3]);
    }
}
