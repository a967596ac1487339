//! Checkpoints: weights (safetensors, mmdet/mmseg parameter names, loadable by `cnx test
//! --weights`), optimizer moments (safetensors) and the resume state (JSON: iteration, data
//! position, seed, optimizer step, loss scale). Every file is written atomically (temp file,
//! fsync, rename, fsync of the directory) and `latest.json` is replaced last, so a crash at any
//! moment leaves the previous checkpoint intact and `--resume auto` finds a complete one.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Everything besides tensors needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeState {
    /// Completed iterations (the next one to run).
    pub iter: u64,
    /// Data position of the next iteration: epoch and batch index within it.
    pub epoch: u64,
    pub iter_in_epoch: u64,
    pub iters_per_epoch: u64,
    pub seed: u64,
    /// AdamW's step count.
    pub optimizer_step: i64,
    /// fp16 dynamic loss scale and its growth tracker.
    pub loss_scale: f64,
    pub scale_growth_tracker: u64,
    /// Best-effort: name of the config, for a warning when resuming with another one.
    pub config_name: String,
    /// File names (in the same directory) of the weights and the optimizer moments.
    pub weights: String,
    pub optimizer: String,
}

/// Write `bytes` to `path` atomically.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    commit(&tmp, path)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

fn commit(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Save named tensors as safetensors, atomically. Tensors are moved to the CPU and made
/// contiguous first.
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp = tmp_path(path);
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.detach().to_device(tch::Device::Cpu).contiguous(),
            )
        })
        .collect();
    Tensor::write_safetensors(&cpu, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    commit(&tmp, path)
}

pub fn load_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))
}

/// Save a full checkpoint for iteration `state.iter` into `dir`; returns the weights path.
pub fn save(
    dir: &Path,
    weights: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    state: &ResumeState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let w = dir.join(&state.weights);
    save_tensors(&w, weights)?;
    save_tensors(&dir.join(&state.optimizer), optimizer)?;
    let json = serde_json::to_vec_pretty(state)?;
    atomic_write(&dir.join(state_file_name(state.iter)), &json)?;
    atomic_write(&dir.join("latest.json"), &json)?;
    Ok(w)
}

pub fn weights_file_name(iter: u64) -> String {
    format!("iter_{iter:07}.safetensors")
}

pub fn optimizer_file_name(iter: u64) -> String {
    format!("iter_{iter:07}.optim.safetensors")
}

pub fn state_file_name(iter: u64) -> String {
    format!("iter_{iter:07}.state.json")
}

/// Resolve `--resume` (a state JSON, a weights file next to one, a directory, or "auto" = the
/// work dir's latest.json) to the state and its directory.
pub fn resolve(arg: &str, work_dir: &Path) -> Result<Option<(ResumeState, PathBuf)>> {
    let path = if arg == "auto" {
        let p = work_dir.join("latest.json");
        if !p.exists() {
            return Ok(None);
        }
        p
    } else {
        let p = PathBuf::from(arg);
        if p.is_dir() {
            p.join("latest.json")
        } else if p.extension().is_some_and(|e| e == "json") {
            p
        } else {
            // iter_0000100.safetensors -> iter_0000100.state.json
            let stem = p
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("bad resume path {arg}"))?;
            let base = stem
                .trim_end_matches(".safetensors")
                .trim_end_matches(".optim");
            p.with_file_name(format!("{base}.state.json"))
        }
    };
    if !path.exists() {
        bail!("--resume {arg}: {} not found", path.display());
    }
    let s: ResumeState = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Some((s, dir)))
}

/// Delete periodic checkpoints older than the newest `keep` (0 keeps all). The one `latest.json`
/// points to is never deleted.
pub fn prune(dir: &Path, keep: usize, latest_iter: u64) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let mut iters: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            n.strip_prefix("iter_")?
                .strip_suffix(".state.json")?
                .parse()
                .ok()
        })
        .collect();
    iters.sort_unstable();
    let n = iters.len();
    for &it in iters.iter().take(n.saturating_sub(keep)) {
        if it == latest_iter {
            continue;
        }
        for f in [
            weights_file_name(it),
            optimizer_file_name(it),
            state_file_name(it),
        ] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_resolve_prune() {
        let dir = std::env::temp_dir().join(format!("cnx-ckpt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for it in [10u64, 20, 30] {
            let st = ResumeState {
                iter: it,
                epoch: 0,
                iter_in_epoch: it,
                iters_per_epoch: 100,
                seed: 1,
                optimizer_step: it as i64,
                loss_scale: 1.0,
                scale_growth_tracker: 0,
                config_name: "x".into(),
                weights: weights_file_name(it),
                optimizer: optimizer_file_name(it),
            };
            let w = vec![(
                "a.weight".to_string(),
                Tensor::from_slice(&[it as f32, 2.0]),
            )];
            save(&dir, &w, &w, &st).unwrap();
            prune(&dir, 2, it).unwrap();
        }
        let (st, d) = resolve("auto", &dir).unwrap().unwrap();
        assert_eq!(st.iter, 30);
        assert_eq!(d, dir);
        let (st20, _) = resolve(dir.join(weights_file_name(20)).to_str().unwrap(), &dir)
            .unwrap()
            .unwrap();
        assert_eq!(st20.iter, 20);
        assert!(!dir.join(weights_file_name(10)).exists());
        let t = load_tensors(&dir.join(weights_file_name(30))).unwrap();
        assert_eq!(t[0].1.double_value(&[0]), 30.0);
        assert!(resolve("auto", &dir.join("nothing")).unwrap().is_none());
        // No temp files left behind.
        assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
