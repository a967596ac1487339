//! Shared by the CLI tests: run the built `cnx` binary as a user would and read its output.
#![allow(dead_code)]

pub mod segmentation_fixture;

use std::process::{Command, Output};

/// Run `cnx ARGS...` to completion (no backtraces in its messages).
pub fn cnx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnx"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run cnx")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout and stderr together (for messages that may go to either).
pub fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// A fresh, empty temporary folder `cnx-<name>-<pid>` for one test.
pub fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cnx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
