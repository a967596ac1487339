//! The image inputs of `cnx predict`: files and folders (`--recursive` descends), each with the
//! output name its results get — the path relative to the folder it was found in (or its file
//! name), extension dropped — made unique so two inputs never write the same file.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Extensions read as images in folders (files given by name are tried whatever they are).
const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "bmp", "webp", "tif"];

/// One image to predict on.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub path: PathBuf,
    /// Output name without extension, relative to the output folder (may contain folders).
    pub out: PathBuf,
}

impl Input {
    /// `out_dir/<out><suffix>` (e.g. `.png`, `_overlay.png`), its folder created.
    pub fn output(&self, out_dir: &Path, suffix: &str) -> Result<PathBuf> {
        let mut name = self.out.clone().into_os_string();
        name.push(suffix);
        let p = out_dir.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(p)
    }
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Images of `dir` (sorted; subfolders too when `recursive`), relative to `dir`.
fn walk(dir: &Path, rel: &Path, recursive: bool, out: &mut Vec<(PathBuf, PathBuf)>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let name = PathBuf::from(p.file_name().unwrap_or_default());
        if p.is_dir() {
            if recursive {
                walk(&p, &rel.join(&name), true, out)?;
            }
        } else if is_image(&p) {
            out.push((p.clone(), rel.join(name.with_extension(""))));
        }
    }
    Ok(())
}

/// Expand files and folders into inputs with unique output names (`name`, `name_1`, ...).
pub fn collect(paths: &[PathBuf], recursive: bool) -> Result<Vec<Input>> {
    let mut found: Vec<(PathBuf, PathBuf)> = Vec::new();
    for p in paths {
        if p.is_dir() {
            let before = found.len();
            walk(p, Path::new(""), recursive, &mut found)?;
            if found.len() == before {
                eprintln!(
                    "{}: no images{}",
                    p.display(),
                    if recursive {
                        ""
                    } else {
                        " (--recursive descends into subfolders)"
                    }
                );
            }
        } else {
            let stem = p
                .file_stem()
                .map(PathBuf::from)
                .unwrap_or_else(|| "image".into());
            found.push((p.clone(), stem));
        }
    }
    if found.is_empty() {
        bail!("no images given");
    }
    let mut used: BTreeSet<PathBuf> = BTreeSet::new();
    Ok(found
        .into_iter()
        .map(|(path, out)| {
            let mut name = out.clone();
            let mut k = 1;
            while !used.insert(name.clone()) {
                let mut n = out.clone().into_os_string();
                n.push(format!("_{k}"));
                name = PathBuf::from(n);
                k += 1;
            }
            Input { path, out: name }
        })
        .collect())
}

/// How a prediction run over several images ends: every image done (0), some skipped and named
/// with the others written (2), or none readable (an error, 1). The same for detectors and
/// segmentors.
pub fn finish(skipped: &[PathBuf], total: usize) -> Result<()> {
    if skipped.is_empty() {
        return Ok(());
    }
    eprintln!("{} of {total} images could not be read:", skipped.len());
    for p in skipped {
        eprintln!("  {}", p.display());
    }
    if skipped.len() == total {
        bail!("no image could be read");
    }
    std::process::exit(2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_recursion_and_unique_names() {
        let d = std::env::temp_dir().join(format!("cnx-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for f in [
            "a/x.jpg",
            "a/sub/x.jpg",
            "a/sub/y.PNG",
            "a/notes.txt",
            "b/x.jpg",
        ] {
            let p = d.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"").unwrap();
        }
        let outs = |v: Vec<Input>| -> Vec<String> {
            v.into_iter().map(|i| i.out.display().to_string()).collect()
        };
        assert_eq!(outs(collect(&[d.join("a")], false).unwrap()), ["x"]);
        assert_eq!(
            outs(collect(&[d.join("a")], true).unwrap()),
            ["sub/x", "sub/y", "x"]
        );
        // Two folders with the same file name, and a file given twice: never the same output.
        assert_eq!(
            outs(collect(&[d.join("a"), d.join("b"), d.join("b/x.jpg")], false).unwrap()),
            ["x", "x_1", "x_2"]
        );
        let i = &collect(&[d.join("a")], true).unwrap()[0];
        let p = i.output(&d.join("out"), "_overlay.png").unwrap();
        assert!(p.ends_with("out/sub/x_overlay.png") && p.parent().unwrap().is_dir());
        assert!(collect(&[d.join("a/sub/nothing")], false).is_ok());
        let empty = d.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(collect(&[empty], true).is_err());
    }
}
