//! Axis-aligned boxes `(x1, y1, x2, y2)` as N,4 float tensors: areas, pairwise IoU / GIoU
//! (torchvision's formulas), mmdet's `bbox_overlaps` (with its eps) and clipping. A batch's
//! RoIs are [`crate::structures::Rois`].

use tch::{Kind, Tensor};

/// Area `(x2 - x1) * (y2 - y1)` of each box.
pub fn box_area(b: &Tensor) -> Tensor {
    (b.select(1, 2) - b.select(1, 0)) * (b.select(1, 3) - b.select(1, 1))
}

/// Intersection areas (N,M) and union areas (N,M), as torchvision's `_box_inter_union`.
fn inter_union(a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
    let area1 = box_area(a);
    let area2 = box_area(b);
    let lt = a
        .slice(1, 0, 2, 1)
        .unsqueeze(1)
        .maximum(&b.slice(1, 0, 2, 1).unsqueeze(0));
    let rb = a
        .slice(1, 2, 4, 1)
        .unsqueeze(1)
        .minimum(&b.slice(1, 2, 4, 1).unsqueeze(0));
    let wh = (rb - lt).clamp_min(0.0);
    let inter = wh.select(2, 0) * wh.select(2, 1);
    let union = area1.unsqueeze(1) + area2.unsqueeze(0) - &inter;
    (inter, union)
}

/// Pairwise IoU (N,M) exactly as `torchvision.ops.box_iou`.
pub fn box_iou(a: &Tensor, b: &Tensor) -> Tensor {
    let (inter, union) = inter_union(a, b);
    inter / union
}

/// Pairwise generalized IoU (N,M) exactly as `torchvision.ops.generalized_box_iou`.
pub fn generalized_box_iou(a: &Tensor, b: &Tensor) -> Tensor {
    let (inter, union) = inter_union(a, b);
    let iou = &inter / &union;
    let lti = a
        .slice(1, 0, 2, 1)
        .unsqueeze(1)
        .minimum(&b.slice(1, 0, 2, 1).unsqueeze(0));
    let rbi = a
        .slice(1, 2, 4, 1)
        .unsqueeze(1)
        .maximum(&b.slice(1, 2, 4, 1).unsqueeze(0));
    let whi = (rbi - lti).clamp_min(0.0);
    let areai = whi.select(2, 0) * whi.select(2, 1);
    &iou - (&areai - &union) / areai
}

/// Element-wise (aligned) GIoU of two N,4 sets, as mmdet's `bbox_overlaps(mode='giou',
/// is_aligned=True, eps=1e-6)` used by `GIoULoss`.
pub fn aligned_giou(a: &Tensor, b: &Tensor) -> Tensor {
    let eps = 1e-6;
    let area1 = box_area(a);
    let area2 = box_area(b);
    let lt = a.slice(1, 0, 2, 1).maximum(&b.slice(1, 0, 2, 1));
    let rb = a.slice(1, 2, 4, 1).minimum(&b.slice(1, 2, 4, 1));
    let wh = (rb - lt).clamp_min(0.0);
    let overlap = wh.select(1, 0) * wh.select(1, 1);
    let union = (area1 + area2 - &overlap).clamp_min(eps);
    let ious = &overlap / &union;
    let elt = a.slice(1, 0, 2, 1).minimum(&b.slice(1, 0, 2, 1));
    let erb = a.slice(1, 2, 4, 1).maximum(&b.slice(1, 2, 4, 1));
    let ewh = (erb - elt).clamp_min(0.0);
    let enclose = (ewh.select(1, 0) * ewh.select(1, 1)).clamp_min(eps);
    ious - (&enclose - union) / enclose
}

/// Pairwise IoU as mmdet's `bbox_overlaps(mode='iou', eps=1e-6)` (what its assigners use):
/// the union is floored at eps so degenerate boxes give 0 instead of NaN.
pub fn bbox_overlaps(a: &Tensor, b: &Tensor) -> Tensor {
    let (inter, union) = inter_union(a, b);
    inter / union.clamp_min(1e-6)
}

/// Clamp x to [0, w] and y to [0, h] (mmdet's clip with `max_shape = (h, w)`).
pub fn clip_boxes(b: &Tensor, h: f64, w: f64) -> Tensor {
    let x1 = b.select(1, 0).clamp(0.0, w);
    let y1 = b.select(1, 1).clamp(0.0, h);
    let x2 = b.select(1, 2).clamp(0.0, w);
    let y2 = b.select(1, 3).clamp(0.0, h);
    Tensor::stack(&[x1, y1, x2, y2], 1)
}

/// Copy a small float tensor to a Vec<f32> (CPU, contiguous).
pub fn to_vec_f32(t: &Tensor) -> Vec<f32> {
    let t = t
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view([-1]);
    Vec::<f32>::try_from(&t).expect("float tensor")
}

/// Copy a small integer tensor to a Vec<i64>.
pub fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    let t = t
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Int64)
        .contiguous()
        .view([-1]);
    Vec::<i64>::try_from(&t).expect("int tensor")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_of_identical_and_disjoint() {
        let a = Tensor::from_slice(&[0f32, 0., 10., 10., 20., 20., 30., 30.]).view([2, 4]);
        let iou = to_vec_f32(&box_iou(&a, &a));
        assert_eq!(iou, vec![1.0, 0.0, 0.0, 1.0]);
        let g = to_vec_f32(&generalized_box_iou(&a, &a));
        assert!((g[1] - (0.0 - (900.0 - 200.0) / 900.0)).abs() < 1e-6);
    }
}
