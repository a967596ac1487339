//! mmdet's `FCNMaskHead` (4 × conv3x3+ReLU, deconv ×2 + ReLU, 1x1 logits per class), its loss
//! (BCE on the GT class's 28×28 channel against RoIAlign-cropped GT masks) and the test-time
//! paste of 28×28 masks into the original image (`_do_paste_mask`: grid_sample over the box's
//! integer neighbourhood, threshold 0.5) — one box at a time on the host's CPU path, all boxes
//! in one batched `grid_sample` per chunk on the device path (same pixels, same values).

use cnx_backbone::nn::{Conv2d, ConvOpts, ConvTranspose2d};
use cnx_backbone::replica::{self, MeanDivisor};
use tch::nn::{Module, Path};
use tch::{Kind, Reduction, Tensor};

#[derive(Debug)]
pub struct FcnMaskHead {
    convs: Vec<Conv2d>,
    upsample: ConvTranspose2d,
    logits: Conv2d,
    pub num_classes: i64,
}

impl FcnMaskHead {
    pub fn new(
        p: &Path,
        in_channels: i64,
        conv_channels: i64,
        num_convs: usize,
        num_classes: i64,
    ) -> Self {
        let convs = (0..num_convs)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { conv_channels };
                Conv2d::new(
                    p / "convs" / i / "conv",
                    cin,
                    conv_channels,
                    3,
                    ConvOpts {
                        padding: 1,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let s = Self {
            convs,
            upsample: ConvTranspose2d::new(p / "upsample", conv_channels, conv_channels, 2, 2),
            logits: Conv2d::new(
                p / "conv_logits",
                conv_channels,
                num_classes,
                1,
                ConvOpts::default(),
            ),
            num_classes,
        };
        use crate::init::{conv_fan_out, kaiming_fan_out};
        for c in s.convs.iter().chain([&s.logits]) {
            kaiming_fan_out(c.weight(), c.bias(), conv_fan_out(c.weight()));
        }
        let up = &s.upsample.inner;
        let sz = up.ws.size();
        kaiming_fan_out(&up.ws, up.bs.as_ref(), sz[0] * sz[2] * sz[3]);
        s
    }

    /// Mask logits (R, K, 2S, 2S) from RoI features (R, C, S, S).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for c in &self.convs {
            x = c.forward(&x).relu();
        }
        let x = self.upsample.forward(&x).relu();
        self.logits.forward(&x)
    }
}

/// Mask loss: mean BCE-with-logits over the positives' GT-class channels (every pixel of every
/// positive RoI of the batch; 0 without positives). Under data parallelism the mean is over
/// the positives of all ranks ([`replica::MeanDivisor`]).
pub fn mask_loss(logits: &Tensor, targets: &Tensor, labels: &Tensor) -> Tensor {
    let n = logits.size()[0];
    let s = logits.size();
    let bce = |reduction| {
        let idx = labels.view([-1, 1, 1, 1]).expand([n, 1, s[2], s[3]], false);
        let pred = logits.gather(1, &idx, false).squeeze_dim(1);
        pred.binary_cross_entropy_with_logits::<Tensor>(
            &targets.to_kind(pred.kind()),
            None,
            None,
            reduction,
        )
    };
    if !replica::has_count_reducer() {
        // Single process: mmdet's expressions, unchanged.
        if n == 0 {
            return logits.sum(Kind::Float) * 0.0;
        }
        return bce(Reduction::Mean);
    }
    // A rank without positives still takes part in the count reduction.
    let div = MeanDivisor::new((n * s[2] * s[3]) as f64, 1.0, logits.device());
    let sum = if n == 0 {
        logits.sum(Kind::Float) * 0.0
    } else {
        bce(Reduction::Sum)
    };
    div.divide(&sum)
}

/// Paste mask probabilities `masks` (N,h,w) into an `img_h`×`img_w` image at `boxes` (N,4), one
/// box at a time over the box's integer neighbourhood (mmdet's CPU path with `skip_empty`), and
/// threshold: returns (N, img_h, img_w) bool. Boxes in original-image coordinates.
pub fn paste_masks(
    masks: &Tensor,
    boxes: &Tensor,
    img_h: i64,
    img_w: i64,
    threshold: f64,
) -> Tensor {
    let n = masks.size()[0];
    let device = masks.device();
    if crate::sync_count::device_paths(device) {
        return paste_masks_batched(masks, boxes, img_h, img_w, threshold);
    }
    let out = Tensor::zeros([n, img_h, img_w], (Kind::Bool, device));
    let bv = crate::boxes::to_vec_f32(boxes);
    crate::sync_count::host_read("paste boxes");
    for i in 0..n {
        let b = &bv[4 * i as usize..4 * i as usize + 4];
        let x0 = ((b[0].floor() - 1.0).max(0.0)) as i64;
        let y0 = ((b[1].floor() - 1.0).max(0.0)) as i64;
        let x1 = ((b[2].ceil() + 1.0).min(img_w as f32)) as i64;
        let y1 = ((b[3].ceil() + 1.0).min(img_h as f32)) as i64;
        if x1 <= x0 || y1 <= y0 {
            continue;
        }
        let bx = boxes.get(i);
        let (bx0, by0, bx1, by1) = (bx.get(0), bx.get(1), bx.get(2), bx.get(3));
        let img_y = Tensor::arange_start(y0, y1, (Kind::Int64, device)).to_kind(Kind::Float) + 0.5;
        let img_x = Tensor::arange_start(x0, x1, (Kind::Int64, device)).to_kind(Kind::Float) + 0.5;
        let gy = (img_y - &by0) / (&by1 - &by0) * 2.0 - 1.0;
        let gx = (img_x - &bx0) / (&bx1 - &bx0) * 2.0 - 1.0;
        let gy = gy.where_self(&gy.isinf().logical_not(), &Tensor::zeros_like(&gy));
        let gx = gx.where_self(&gx.isinf().logical_not(), &Tensor::zeros_like(&gx));
        let (hh, ww) = (y1 - y0, x1 - x0);
        let grid = Tensor::stack(
            &[
                gx.view([1, -1]).expand([hh, ww], false),
                gy.view([-1, 1]).expand([hh, ww], false),
            ],
            2,
        )
        .unsqueeze(0);
        let m = masks
            .get(i)
            .to_kind(Kind::Float)
            .view([1, 1, masks.size()[1], masks.size()[2]]);
        let pasted = m
            .grid_sampler(&grid, 0, 0, false)
            .view([hh, ww])
            .ge(threshold);
        out.get(i)
            .slice(0, y0, y1, 1)
            .slice(1, x0, x1, 1)
            .copy_(&pasted);
    }
    out
}

/// [`paste_masks`] without host reads or a loop over boxes: every box samples the whole image
/// in one `grid_sample` per chunk of boxes (mmdet's GPU path), and pixels outside the box's
/// integer neighbourhood (the region the CPU path samples) are cleared, so the result is the
/// CPU path's, pixel for pixel: inside the neighbourhood the grid values are the same
/// expressions of the same numbers.
pub fn paste_masks_batched(
    masks: &Tensor,
    boxes: &Tensor,
    img_h: i64,
    img_w: i64,
    threshold: f64,
) -> Tensor {
    let n = masks.size()[0];
    let device = masks.device();
    if n == 0 {
        return Tensor::zeros([0, img_h, img_w], (Kind::Bool, device));
    }
    let boxes = boxes.to_kind(Kind::Float);
    let (bx0, by0, bx1, by1) = (
        boxes.select(1, 0).view([-1, 1]),
        boxes.select(1, 1).view([-1, 1]),
        boxes.select(1, 2).view([-1, 1]),
        boxes.select(1, 3).view([-1, 1]),
    );
    // The neighbourhood [floor(x1) - 1, ceil(x2) + 1) ∩ image, as the CPU path computes it
    // (in f32, truncated to integers).
    let lo = |c: &Tensor| (c.floor() - 1.0).clamp_min(0.0).to_kind(Kind::Int64);
    let hi = |c: &Tensor, lim: i64| (c.ceil() + 1.0).clamp_max(lim as f64).to_kind(Kind::Int64);
    let (x0, y0, x1, y1) = (lo(&bx0), lo(&by0), hi(&bx1, img_w), hi(&by1, img_h));
    let px = Tensor::arange(img_w, (Kind::Int64, device)).view([1, -1]);
    let py = Tensor::arange(img_h, (Kind::Int64, device)).view([1, -1]);
    let in_x = px.ge_tensor(&x0).logical_and(&px.lt_tensor(&x1)); // (N, W)
    let in_y = py.ge_tensor(&y0).logical_and(&py.lt_tensor(&y1)); // (N, H)
    let img_x = px.to_kind(Kind::Float) + 0.5;
    let img_y = py.to_kind(Kind::Float) + 0.5;
    let gx = (img_x - &bx0) / (&bx1 - &bx0) * 2.0 - 1.0;
    let gy = (img_y - &by0) / (&by1 - &by0) * 2.0 - 1.0;
    let gx = gx.where_self(&gx.isinf().logical_not(), &Tensor::zeros_like(&gx));
    let gy = gy.where_self(&gy.isinf().logical_not(), &Tensor::zeros_like(&gy));
    let (mh, mw) = (masks.size()[1], masks.size()[2]);
    let masks = masks.to_kind(Kind::Float).view([n, 1, mh, mw]);
    // Boxes per chunk: the (chunk, H, W, 2) grid stays around 256 MB.
    let per = ((1i64 << 25) / (img_h * img_w).max(1)).max(1);
    let mut outs = Vec::new();
    let mut i = 0;
    while i < n {
        let j = (i + per).min(n);
        let m = j - i;
        let grid = Tensor::stack(
            &[
                gx.slice(0, i, j, 1)
                    .view([m, 1, img_w])
                    .expand([m, img_h, img_w], false),
                gy.slice(0, i, j, 1)
                    .view([m, img_h, 1])
                    .expand([m, img_h, img_w], false),
            ],
            3,
        );
        let pasted = masks
            .slice(0, i, j, 1)
            .grid_sampler(&grid, 0, 0, false)
            .view([m, img_h, img_w])
            .ge(threshold);
        let inside = in_y
            .slice(0, i, j, 1)
            .unsqueeze(2)
            .logical_and(&in_x.slice(0, i, j, 1).unsqueeze(1));
        outs.push(pasted.logical_and(&inside));
        i = j;
    }
    Tensor::cat(&outs, 0)
}
