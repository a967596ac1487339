//! Detections → COCO results entries (`bbox` as x,y,w,h in original pixels, original category
//! ids, compressed-RLE `segmentation` via `cnx_eval::mask`), plus the image's `file_name`.

use cnx_eval::Rle;
use cnx_heads::structures::Detections;
use serde::{Deserialize, Serialize};

/// Compressed RLE in COCO JSON form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RleJson {
    pub size: [usize; 2],
    pub counts: String,
}

/// One COCO results entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoResult {
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<RleJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
}

/// Convert one image's detections; `label_to_cat` maps contiguous labels to COCO ids.
pub fn to_coco(
    det: &Detections,
    image_id: i64,
    file_name: Option<&str>,
    label_to_cat: &dyn Fn(i64) -> i64,
) -> Vec<CocoResult> {
    let b = cnx_heads::boxes::to_vec_f32(&det.boxes);
    let s = cnx_heads::boxes::to_vec_f32(&det.scores);
    let l = cnx_heads::boxes::to_vec_i64(&det.labels);
    let masks = det.masks.as_ref().map(|m| {
        let sz = m.size();
        let (h, w) = (sz[1] as usize, sz[2] as usize);
        let bytes = Vec::<u8>::try_from(
            &m.to_device(tch::Device::Cpu)
                .to_kind(tch::Kind::Uint8)
                .contiguous()
                .view([-1]),
        )
        .expect("u8 masks");
        (h, w, bytes)
    });
    (0..s.len())
        .map(|i| {
            let (x1, y1, x2, y2) = (
                b[4 * i] as f64,
                b[4 * i + 1] as f64,
                b[4 * i + 2] as f64,
                b[4 * i + 3] as f64,
            );
            let segmentation = masks.as_ref().map(|(h, w, bytes)| {
                let rle = Rle::encode_row_major(&bytes[i * h * w..(i + 1) * h * w], *h, *w);
                RleJson {
                    size: [*h, *w],
                    counts: rle.to_compressed_string(),
                }
            });
            CocoResult {
                image_id,
                category_id: label_to_cat(l[i]),
                bbox: [x1, y1, x2 - x1, y2 - y1],
                score: s[i] as f64,
                segmentation,
                file_name: file_name.map(str::to_string),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn boxes_become_xywh_with_dataset_ids_and_masks_round_trip_through_rle() {
        // Two detections on a 4x5 image; the second mask is an L shape.
        let m = Tensor::zeros([2, 4, 5], (Kind::Bool, tch::Device::Cpu));
        let _ = m.get(0).get(1).fill_(1);
        let _ = m.get(1).narrow(1, 0, 1).fill_(1);
        let _ = m.get(1).get(3).fill_(1);
        let det = Detections {
            boxes: Tensor::from_slice(&[1f32, 2., 4., 3., 0., 0., 5., 4.]).view([2, 4]),
            scores: Tensor::from_slice(&[0.9f32, 0.25]),
            labels: Tensor::from_slice(&[2i64, 0]),
            masks: Some(m.shallow_clone()),
        };
        let res = to_coco(&det, 42, Some("a.jpg"), &|l| [1, 5, 9][l as usize]);
        assert_eq!(res.len(), 2);
        assert_eq!(res[0].category_id, 9);
        assert_eq!(res[1].category_id, 1);
        assert_eq!(res[0].bbox, [1.0, 2.0, 3.0, 1.0]);
        assert_eq!(res[1].bbox, [0.0, 0.0, 5.0, 4.0]);
        assert!((res[0].score - 0.9).abs() < 1e-6 && res[0].image_id == 42);
        assert_eq!(res[1].file_name.as_deref(), Some("a.jpg"));
        for (i, r) in res.iter().enumerate() {
            let seg = r.segmentation.as_ref().unwrap();
            assert_eq!(seg.size, [4, 5]);
            // Decoded column-major RLE equals the mask.
            let rle = Rle::from_compressed_string(&seg.counts, 4, 5).unwrap();
            let want =
                Vec::<u8>::try_from(m.get(i as i64).to_kind(Kind::Uint8).contiguous().view([-1]))
                    .unwrap();
            assert_eq!(rle.decode_row_major().unwrap(), want, "detection {i}");
        }
    }
}
