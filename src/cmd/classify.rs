//! `cnx classify --model NAME --weights FILE IMAGE...`: ImageNet classification with a ConvNeXt,
//! Swin, ResNet/ResNeXt or roadmap checkpoint (official, timm, torchvision or safetensors), using
//! the official evaluation preprocessing.
//!
//! Preprocessing (the official `build_transform` / timm eval transform): resize the shorter side
//! to `int(size / crop_pct)` with bicubic interpolation, center-crop `size` x `size`, scale to
//! [0, 1], normalise with the ImageNet mean/std. `--crop-pct 1.0` resizes straight to size x size
//! (as the official code does for 384 px evaluation). Bicubic is the `image` crate's CatmullRom,
//! the same kernel as PIL's BICUBIC (Keys cubic, a = -0.5, support widened when downscaling, i.e.
//! antialiased). The difference: PIL rounds to 8 bits between its horizontal and vertical passes
//! and uses fixed-point weights, the `image` crate keeps f32 in between, so pixels may differ by
//! one intensity level; top-k predictions are unaffected in practice.

use anyhow::{bail, Context, Result};
use cnx_backbone::checkpoint::{self, LoadOptions, StateDict};
use cnx_backbone::config::{self as bbcfg, Classifier};
use image::imageops::FilterType;
use image::RgbImage;
use serde::Serialize;
use std::path::PathBuf;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
const IMAGENET1K: &str = include_str!("imagenet1k_classes.txt");

#[derive(clap::Args)]
pub struct Args {
    /// convnext_{tiny,small,base,large,xlarge}, swin_{tiny,small,base,large}, resnet50,
    /// resnet101, resnext101_32x4d, resnext101_64x4d, or a roadmap_* model (`cnx flops --list`).
    #[arg(long)]
    pub model: String,
    /// Checkpoint: official, timm or torchvision .pth, or safetensors. The class count comes from
    /// its head.
    #[arg(long)]
    pub weights: PathBuf,
    /// Resize the shorter side to size / crop_pct before the center crop; 1.0 resizes to size.
    #[arg(long, default_value_t = 0.875)]
    pub crop_pct: f64,
    /// Side of the square network input.
    #[arg(long, default_value_t = 224)]
    pub size: u32,
    /// Classes to report per image.
    #[arg(long, default_value_t = 5)]
    pub topk: i64,
    /// Print JSON: [{"image": path, "top": [{"class": index, "prob": p}, ...]}, ...].
    #[arg(long)]
    pub json: bool,
    /// auto, cpu, cuda or cuda:N (auto: cuda:0 when libtorch sees a GPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Images (JPEG or PNG).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Top {
    class: i64,
    prob: f64,
}

#[derive(Serialize)]
struct Prediction {
    image: String,
    top: Vec<Top>,
}

/// Loads an image and applies the evaluation transform; returns a 3 x size x size f32 tensor.
pub fn preprocess(path: &std::path::Path, size: u32, crop_pct: f64) -> Result<Tensor> {
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))?
        .to_rgb8();
    Ok(normalize(&resize_crop(&img, size, crop_pct)))
}

/// Bicubic resize (shorter side to `int(size / crop_pct)`) and center crop to size x size;
/// `crop_pct >= 1` resizes straight to size x size.
pub fn resize_crop(img: &RgbImage, size: u32, crop_pct: f64) -> RgbImage {
    let (w, h) = img.dimensions();
    if crop_pct >= 1.0 {
        return image::imageops::resize(img, size, size, FilterType::CatmullRom);
    }
    // torchvision Resize(int): shorter side to `scale`, longer side int(scale * long / short).
    let scale = (size as f64 / crop_pct).floor() as u32;
    let (nw, nh) = if w <= h {
        (scale, (scale as f64 * h as f64 / w as f64) as u32)
    } else {
        ((scale as f64 * w as f64 / h as f64) as u32, scale)
    };
    let r = image::imageops::resize(img, nw, nh, FilterType::CatmullRom);
    // torchvision CenterCrop: top = int(round((h - size) / 2)).
    let top = ((nh as f64 - size as f64) / 2.0).round() as u32;
    let left = ((nw as f64 - size as f64) / 2.0).round() as u32;
    image::imageops::crop_imm(&r, left, top, size, size).to_image()
}

/// HWC u8 → CHW f32 in [0, 1], normalised with the ImageNet mean / std.
pub fn normalize(img: &RgbImage) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut chw = vec![0f32; 3 * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[c * h * w + y as usize * w + x as usize] = (p[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    Tensor::from_slice(&chw).view([3, h as i64, w as i64])
}

/// Builds the named classifier (any family: `convnext_*`, `swin_*`, `resnet*`, `resnext*`,
/// `roadmap_*`) with the class count of the checkpoint's head and loads it strictly; errors
/// list missing / unexpected / mis-shaped tensors.
pub fn load_classifier(
    model: &str,
    weights: &std::path::Path,
    device: Device,
) -> Result<(VarStore, Box<dyn Classifier>)> {
    let convnext = ["tiny", "small", "base", "large", "xlarge"].map(|v| format!("convnext_{v}"));
    let mut known: Vec<String> = convnext.to_vec();
    known.extend(bbcfg::classifier_names());
    if !known.iter().any(|n| n == model) {
        bail!(
            "unknown model '{model}'; classify takes {}",
            known.join(", ")
        );
    }
    let sd = checkpoint::read_state_dict(weights)?;
    let sd = classifier_state_dict(model, &sd);
    let key = bbcfg::classifier_head_key(model);
    let head = sd.get(key).with_context(|| {
        format!(
            "{}: no classifier head ('{key}') in the checkpoint for {model}",
            weights.display()
        )
    })?;
    let mut vs = VarStore::new(device);
    let net = bbcfg::build_classifier(&vs.root(), model, head.size()[0])?;
    let report = checkpoint::load_into(&mut vs, &sd, &LoadOptions::strict())
        .with_context(|| format!("loading {} into {model}", weights.display()))?;
    debug_assert!(report.is_clean());
    Ok((vs, net))
}

/// A classification checkpoint in the names [`bbcfg::build_classifier`] creates: ConvNeXt from
/// the official / timm layouts, Swin from the official / timm / mmcls ones, ResNets from
/// torchvision's (`module.` / `backbone.` prefixes and BN's `num_batches_tracked` dropped).
fn classifier_state_dict(model: &str, sd: &StateDict) -> StateDict {
    if model.starts_with("convnext_") {
        return sd.to_official();
    }
    let pairs: Vec<(String, Tensor)> = sd
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let pairs = if model.starts_with("swin_") {
        cnx_backbone::swin::convert_state_dict(pairs)
    } else {
        pairs
            .into_iter()
            .map(|(k, t)| {
                let k = k.strip_prefix("module.").unwrap_or(&k);
                (k.strip_prefix("backbone.").unwrap_or(k).to_string(), t)
            })
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
            .collect()
    };
    let mut out = StateDict::default();
    for (k, t) in pairs {
        out.insert(k, t);
    }
    out
}

pub fn run(args: Args) -> Result<()> {
    if !(args.crop_pct > 0.0 && args.crop_pct <= 1.0) {
        bail!("--crop-pct must be in (0, 1], got {}", args.crop_pct);
    }
    if args.size < 32 {
        bail!("--size must be at least 32");
    }
    // Fail on a missing image before spending time on the model.
    for p in &args.images {
        std::fs::File::open(p).with_context(|| format!("cannot read image {}", p.display()))?;
    }
    let device = crate::device::resolve(&args.device)?;
    let (_vs, net) = load_classifier(&args.model, &args.weights, device)?;
    let mut names: Vec<&str> = Vec::new();
    let mut k = args.topk.max(1);
    let mut preds = Vec::new();
    // Batches of 16 images keep memory bounded for long image lists.
    for chunk in args.images.chunks(16) {
        let xs = chunk
            .iter()
            .map(|p| preprocess(p, args.size, args.crop_pct))
            .collect::<Result<Vec<_>>>()?;
        let batch = Tensor::stack(&xs, 0).to_device(device);
        let probs = tch::no_grad(|| net.logits(&batch))
            .softmax(-1, Kind::Float)
            .to_device(Device::Cpu);
        let classes = probs.size()[1];
        if classes == 1000 {
            names = IMAGENET1K.lines().collect();
        }
        k = k.min(classes);
        let (p, idx) = probs.topk(k, -1, true, true);
        for (i, path) in chunk.iter().enumerate() {
            let top = (0..k)
                .map(|j| Top {
                    class: idx.int64_value(&[i as i64, j]),
                    prob: p.double_value(&[i as i64, j]),
                })
                .collect();
            preds.push(Prediction {
                image: path.display().to_string(),
                top,
            });
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&preds)?);
        return Ok(());
    }
    for pr in &preds {
        println!("{}", pr.image);
        for t in &pr.top {
            let name = names
                .get(t.class as usize)
                .map(|n| n.split(',').next().unwrap_or(n))
                .unwrap_or("");
            println!("  {:>6.2}%  {:>5}  {}", t.prob * 100.0, t.class, name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our resize + crop against timm's PIL transform on a lossless synthetic image
    /// (tools/reference/gen_backbone.py). PIL rounds to 8 bits between its two passes; the image
    /// crate does not, hence a tolerance of a couple of intensity levels (measured: max 1, mean 0.07).
    #[test]
    fn preprocessing_matches_timm_eval_transform() {
        let dir = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/classify"
        ));
        let img = image::open(dir.join("synthetic.png")).unwrap().to_rgb8();
        let want = Tensor::read_safetensors(dir.join("synthetic_expected.safetensors")).unwrap();
        let get = |k: &str| &want.iter().find(|(n, _)| n == k).unwrap().1;
        for (name, size, crop) in [("s224_c0875", 224u32, 0.875), ("s160_c0950", 160, 0.95)] {
            let ours = resize_crop(&img, size, crop);
            let ours_t = Tensor::from_slice(ours.as_raw())
                .view([size as i64, size as i64, 3])
                .to_kind(Kind::Float);
            let theirs = get(name).to_kind(Kind::Float);
            assert_eq!(ours_t.size(), theirs.size());
            let d = (&ours_t - &theirs).abs();
            let mean = d.mean(Kind::Float).double_value(&[]);
            let max = d.max().double_value(&[]);
            println!("{name}: |ours - PIL| mean {mean:.3} max {max} (8-bit levels)");
            assert!(mean < 0.2, "{name}: mean abs diff {mean} levels");
            assert!(max <= 2.0, "{name}: max abs diff {max} levels");
            // normalisation: identical formula on identical pixels
            let theirs_u8 = get(name).permute([2, 0, 1]).to_kind(Kind::Uint8);
            let pixels: Vec<u8> =
                Vec::try_from(theirs_u8.permute([1, 2, 0]).contiguous().flatten(0, -1)).unwrap();
            let timm_img = RgbImage::from_raw(size, size, pixels).unwrap();
            let n = normalize(&timm_img).narrow(1, 0, 4).narrow(2, 0, 4);
            let e = (&n - get(&format!("{name}.normalized_corner")))
                .abs()
                .max()
                .double_value(&[]);
            assert!(e < 1e-5, "{name}: normalisation differs by {e}");
        }
    }

    #[test]
    fn crop_pct_one_resizes_straight_to_size() {
        let img = RgbImage::new(300, 200);
        assert_eq!(resize_crop(&img, 224, 1.0).dimensions(), (224, 224));
        assert_eq!(resize_crop(&img, 224, 0.875).dimensions(), (224, 224));
    }
}
