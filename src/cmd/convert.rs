//! `cnx convert IN OUT.safetensors [--prefix P] [--strip-prefix P]`: rewrites a checkpoint in
//! our canonical form — official ConvNeXt names, safetensors.
//!
//! Input: official or timm `.pth` (bare state dict or under `model` / `state_dict`), mmdet /
//! mmseg whole-model checkpoints (every key kept: backbone, neck, heads), or safetensors. timm
//! ConvNeXt names are mapped to the official ones wherever they sit (also under `backbone.`);
//! `num_batches_tracked` buffers are dropped (nothing reads them). Dtypes are kept as stored.

use anyhow::{Context, Result};
use cnx_backbone::checkpoint::{self, LoadOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint to read (.pth zip archive or .safetensors).
    pub input: PathBuf,
    /// safetensors file to write.
    pub output: PathBuf,
    /// Prepend this to every key, e.g. `backbone.` to turn ImageNet weights into the backbone
    /// part of a detector / segmentor checkpoint.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Keep only the keys under this prefix, with it removed, e.g. `backbone.` to take the
    /// backbone out of an mmdet / mmseg checkpoint. Applied before --prefix.
    #[arg(long)]
    pub strip_prefix: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let sd = checkpoint::read_state_dict(&args.input)?;
    let opts = LoadOptions {
        strip_prefix: args.strip_prefix.clone(),
        add_prefix: args.prefix.clone(),
        ..LoadOptions::default()
    };
    let (out, skipped, timm) = checkpoint::prepare(&sd, &opts);
    if out.is_empty() {
        anyhow::bail!(
            "{}: no tensors left to write (check --strip-prefix)",
            args.input.display()
        );
    }
    out.write_safetensors(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let params: i64 = out.iter().map(|(_, t)| t.numel() as i64).sum();
    println!(
        "wrote {} tensors ({:.2}M values) to {}{}{}",
        out.len(),
        params as f64 / 1e6,
        args.output.display(),
        if timm {
            "; timm names mapped to official"
        } else {
            ""
        },
        if skipped > 0 {
            format!("; {skipped} keys skipped (outside --strip-prefix or num_batches_tracked)")
        } else {
            String::new()
        }
    );
    Ok(())
}
