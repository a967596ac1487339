//! `cnx doctor` reports the process-wide choices that decide CPU speed, probed in the process
//! itself: whether a freed large block comes back without page faults (the allocator policy
//! `main` applies before any thread starts) and whether 3x3 convolutions use Winograd.

mod common;

use std::process::Command;

fn doctor(env: &[(&str, &str)]) -> serde_json::Value {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cnx"));
    c.args(["doctor", "--json"]);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run cnx doctor");
    assert!(o.status.success(), "{}", common::text(&o));
    serde_json::from_slice(&o.stdout).expect("doctor --json prints JSON")
}

#[test]
fn freed_large_blocks_are_reused_unless_turned_off() {
    let on = doctor(&[]);
    assert_eq!(on["freed_memory_reused"], true, "{on}");
    assert_eq!(on["cpu_winograd"], true, "{on}");
    // glibc's defaults: a 64 MB block is mmapped afresh (and page-faulted in) every time.
    let off = doctor(&[("CNX_KEEP_FREED_MEMORY", "0"), ("CNX_WINOGRAD", "0")]);
    assert_eq!(off["freed_memory_reused"], false, "{off}");
    assert_eq!(off["cpu_winograd"], false, "{off}");
}
