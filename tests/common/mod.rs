//! Shared by the CLI tests: run the built `cnx` binary as a user would and read its output.
#![allow(dead_code)]

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
