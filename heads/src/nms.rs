//! Non-maximum suppression: a CPU loop over score-sorted boxes in a contiguous f32 buffer (the
//! same arithmetic and tie order as `torchvision.ops.nms`: stable descending sort, suppress when
//! IoU > threshold), plus batched NMS per class / level id with the coordinate-offset trick that
//! torchvision and mmcv use, and mmcv's per-id loop for very large inputs.

use tch::{Device, Kind, Tensor};

/// Indices (into `boxes`) kept by NMS over `boxes` (N,4) `x1,y1,x2,y2` with `scores` (N),
/// in decreasing score order. Identical to `torchvision.ops.nms`.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Tensor {
    let device = boxes.device();
    let n = boxes.size()[0];
    if n == 0 {
        return Tensor::zeros([0], (Kind::Int64, device));
    }
    let order = scores.to_kind(Kind::Float).argsort_stable(true, 0, true);
    let b = boxes
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let order_v = crate::boxes::to_vec_i64(&order);
    let bv = Vec::<f32>::try_from(&b.view([-1])).expect("f32 boxes");
    let keep = nms_sorted(&bv, &order_v, iou_threshold as f32);
    Tensor::from_slice(&keep).to_device(device)
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
    if n < 10000 {
        return batched_nms(boxes, scores, idxs, iou_threshold);
    }
    // Per-id loop: offsets are still applied (mmcv computes boxes_for_nms before splitting).
    let max_coordinate = boxes.max();
    let shifted = boxes + (idxs.to_kind(boxes.kind()) * (max_coordinate + 1.0)).unsqueeze(1);
    let ids = crate::boxes::to_vec_i64(&idxs.unique_dim(0, true, false, false).0);
    let mut kept: Vec<Tensor> = Vec::new();
    for id in ids {
        let mask = idxs.eq(id).nonzero().view([-1]);
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
