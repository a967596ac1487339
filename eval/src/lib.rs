//! `cnx-eval`: evaluation numbers identical to the reference tools, without libtorch.
//!
//! - [`mask`]: COCO run-length encoded masks, a bit-exact port of pycocotools' `maskApi.c`
//!   (polygon rasterization, compressed strings, area, boxes, IoU, merge). [`Rle`] is the
//!   type other crates use to rasterize COCO polygons and to encode predicted masks.
//! - [`coco`]: COCOeval for `bbox` and `segm` with pycocotools' exact semantics, in parallel:
//!   [`coco::CocoGt::load`], [`coco::load_results`] or [`coco::Detection`]s built in memory,
//!   then [`coco::evaluate`] → [`coco::CocoEval`] (12 stats as [`coco::Summary`], the
//!   `precision[T,R,K,A,M]` / `recall[T,K,A,M]` arrays, per-category AP).
//! - [`miou`]: mmsegmentation's IoU metric (aAcc, mIoU, mAcc, per-class), streaming through
//!   [`miou::Accumulator::add`] and [`miou::Accumulator::summary`].
//!
//! - `cli` (feature `cli`): the `cnx eval` / `cnx-eval` command line.
//!
//! Parity with pycocotools / mmseg is checked bit for bit by the tests under `tests/`
//! (fixtures from `tools/reference/gen_eval.py`).
//!
//! ```
//! use cnx_eval::Rle;
//! // A triangle on a 10x10 image, rasterized exactly as pycocotools does.
//! let rle = Rle::from_polygons(&[vec![1.0, 1.0, 8.0, 1.0, 1.0, 8.0]], 10, 10);
//! assert!(rle.area() > 0);
//! let s = rle.to_compressed_string();
//! assert_eq!(Rle::from_compressed_string(&s, 10, 10).unwrap(), rle);
//! ```

#[cfg(feature = "cli")]
pub mod cli;
pub mod coco;
pub mod error;
pub mod mask;
pub mod miou;
pub mod numpy;

pub use error::{EvalError, MaskError};
pub use mask::Rle;
