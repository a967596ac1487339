//! The data side's adapters to the heads: dataset batches (`cnx-datasets`) become the heads'
//! typed inputs (image tensor, `ImgMeta`, `GtInstances`), and one image goes through the
//! segmentor's test-time preprocessing (cv2-exact keep-ratio resize). The heads crate depends on
//! the backbone only, so every dataset-to-tensor step lives here, used by the engine's tasks and
//! the commands alike.

use cnx_datasets::image_io::{self, Image8};
use cnx_datasets::{DetBatch, DetTargets, ImageMeta, Masks};
use cnx_heads::segmentor::{Segmentor, TestMode};
use cnx_heads::structures::{Detections, GtInstances, ImgMeta, InstanceMasks, Losses};
use cnx_heads::two_stage::TwoStageDetector;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The heads' per-image meta of a pipeline's `ImageMeta`.
pub fn img_meta(m: &ImageMeta) -> ImgMeta {
    ImgMeta {
        img_shape: (m.img_shape.0 as i64, m.img_shape.1 as i64),
        pad_shape: (m.pad_shape.0 as i64, m.pad_shape.1 as i64),
        ori_shape: (m.ori_shape.0 as i64, m.ori_shape.1 as i64),
        scale_factor: m.scale_factor,
    }
}

/// The dataset's compact instance masks as the mask head's target source.
#[derive(Debug)]
struct DatasetMasks(Masks);

impl InstanceMasks for DatasetMasks {
    fn crop_and_resize(&self, boxes: &[[f32; 4]], gt_inds: &[usize], out: usize) -> Vec<u8> {
        self.0.crop_and_resize(boxes, gt_inds, out)
    }
}

/// A dataset's masks as the heads' ground-truth mask source.
pub fn instance_masks(masks: Masks) -> Arc<dyn InstanceMasks> {
    Arc::new(DatasetMasks(masks))
}

/// One image's training targets on `device`.
pub fn gt_instances(t: &DetTargets, device: Device) -> GtInstances {
    let g = t.labels.len() as i64;
    GtInstances {
        boxes: Tensor::from_slice(&t.boxes).view([g, 4]).to_device(device),
        labels: Tensor::from_slice(&t.labels).to_device(device),
        masks: Some(instance_masks(t.masks.clone())),
    }
}

/// Host data to `device`: on CUDA from pinned memory by a non-blocking copy (the host goes on
/// preparing work while the bytes travel; libtorch's pinned allocator keeps the buffer alive
/// until the copy has run).
pub fn upload(t: Tensor, device: Device) -> Tensor {
    if device.is_cuda() {
        t.pin_memory(device)
            .to_device_(device, t.kind(), true, false)
    } else {
        t.to_device(device)
    }
}

/// A batch of zero-padded RGB bytes `(N,3,H,W)` ([`cnx_datasets::pipeline::chw_into`]) as
/// normalised float images on `device`: the bytes travel ([`upload`], a quarter of the floats'
/// traffic) and are normalised there with the host pipeline's arithmetic (`(x - mean) *
/// (1/std)` in f32, as [`cnx_datasets::pipeline::normalize_into`] and mmcv's `imnormalize`), each
/// image's padding beyond its `sizes` entry set back to zero (padding follows normalisation).
pub fn images_to_device(
    bytes: &[u8],
    shape: [usize; 4],
    sizes: &[(usize, usize)],
    device: Device,
) -> Tensor {
    use cnx_datasets::pipeline::{MEAN, STD};
    let s = shape.map(|v| v as i64);
    let x = upload(Tensor::from_slice(bytes).view(s), device).to_kind(Kind::Float);
    for c in 0..3 {
        let inv = (1.0 / STD[c] as f64) as f32;
        let _ = x
            .select(1, c as i64)
            .g_sub_scalar_(MEAN[c] as f64)
            .g_mul_scalar_(inv as f64);
    }
    let (h_pad, w_pad) = (s[2], s[3]);
    for (i, &(h, w)) in sizes.iter().enumerate() {
        let (h, w) = (h as i64, w as i64);
        let img = x.get(i as i64);
        if h < h_pad {
            let _ = img.narrow(1, h, h_pad - h).fill_(0.0);
        }
        if w < w_pad {
            let _ = img.narrow(1, 0, h).narrow(2, w, w_pad - w).fill_(0.0);
        }
    }
    x
}

/// Image tensor (N,3,H,W) on `device` and the heads' metas of a detection batch.
pub fn batch_inputs(batch: &DetBatch, device: Device) -> (Tensor, Vec<ImgMeta>) {
    let images = images_to_device(&batch.images, batch.shape, &batch.sizes, device);
    (images, batch.metas.iter().map(img_meta).collect())
}

/// [`TwoStageDetector::forward_train`] on a detection batch (moved to `device`), padded to the
/// data-parallel global batch's shape when ranks agree on one
/// ([`crate::engine::distributed::agreed_batch_shape`]).
pub fn forward_train_batch(det: &TwoStageDetector, batch: &DetBatch, device: Device) -> Losses {
    let (images, metas) = batch_inputs(batch, device);
    let s = images.size();
    let [h, w] = crate::engine::distributed::agreed_batch_shape([s[2], s[3]]);
    // Zero padding at the bottom/right, as the collate pads (zeros after normalisation).
    let images = if [h, w] != [s[2], s[3]] {
        images.constant_pad_nd([0, w - s[3], 0, h - s[2]])
    } else {
        images
    };
    let gts: Vec<GtInstances> = batch
        .targets
        .iter()
        .map(|t| gt_instances(t, device))
        .collect();
    det.forward_train(&images, &metas, &gts)
}

/// [`TwoStageDetector::predict`] on a detection batch.
pub fn predict_batch(det: &TwoStageDetector, batch: &DetBatch, device: Device) -> Vec<Detections> {
    let (images, metas) = batch_inputs(batch, device);
    det.predict(&images, &metas)
}

/// An RGB [`Image8`] as an H,W,3 uint8 tensor.
pub fn image_tensor(img: &Image8) -> Tensor {
    Tensor::from_slice(&img.data).view([img.h as i64, img.w as i64, img.c as i64])
}

/// The segmentor's whole test pipeline on one RGB image of any size
/// ([`Segmentor::predict_resized`] with mmcv's cv2-exact keep-ratio bilinear resize): 1,C,H,W
/// scores at the original size.
pub fn predict_image(
    seg: &Segmentor,
    img: &Image8,
    mode: TestMode,
    aug: bool,
    device: Device,
) -> Tensor {
    let resize = |scale: [i64; 2]| {
        let ((nw, nh), _) =
            image_io::rescale_size(img.w, img.h, (scale[0] as usize, scale[1] as usize));
        image_tensor(&image_io::resize_bilinear(img, nw, nh))
    };
    seg.predict_resized([img.h as i64, img.w as i64], &resize, mode, aug, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnx_datasets::pipeline::{chw_into, normalize_into};

    /// Bytes normalised on the device equal the host pipeline's floats bit for bit, padding
    /// (below and right of each image, of different sizes in one batch) included.
    #[test]
    fn device_normalisation_equals_the_host_pipeline() {
        let (ph, pw) = (40, 56);
        let imgs: Vec<Image8> = [(37, 50), (40, 33)]
            .iter()
            .enumerate()
            .map(|(k, &(h, w))| {
                let mut im = Image8::new(w, h, 3);
                for (i, v) in im.data.iter_mut().enumerate() {
                    *v = ((i * 7919 + k * 31) % 256) as u8;
                }
                im
            })
            .collect();
        let plane = 3 * ph * pw;
        let mut bytes = vec![0u8; 2 * plane];
        let mut floats = vec![0f32; 2 * plane];
        for (k, im) in imgs.iter().enumerate() {
            chw_into(im, &mut bytes[k * plane..(k + 1) * plane], pw, ph);
            normalize_into(im, &mut floats[k * plane..(k + 1) * plane], pw, ph);
        }
        let sizes: Vec<(usize, usize)> = imgs.iter().map(|i| (i.h, i.w)).collect();
        let got = images_to_device(&bytes, [2, 3, ph, pw], &sizes, Device::Cpu);
        let got = Vec::<f32>::try_from(got.view([-1])).unwrap();
        assert_eq!(got.len(), floats.len());
        let differing = got
            .iter()
            .zip(&floats)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differing, 0,
            "{differing} values differ from the host pipeline"
        );
        // The padding really is there and zero (a bug leaving it at -mean/std would differ).
        assert_eq!(floats[plane - 1], 0.0);
    }
}
