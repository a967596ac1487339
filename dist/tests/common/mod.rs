//! The multi-process harness shared by the test binaries: each test re-runs its own test binary
//! once per rank (`--exact <test> --nocapture`, with the rank, world size and port in
//! `CNX_DIST_TEST_*`), so no helper binary is needed: in a child the same test function sees the
//! variables and runs the worker body instead of spawning.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cnx_dist::{Backend, DistEnv, ProcessGroup};

/// Collective timeout in the workers: long enough for a loaded 2-core machine, short enough that a
/// broken test fails fast.
pub const PG_TIMEOUT: Duration = Duration::from_secs(20);
/// The whole multi-process test, from spawn to the last exit.
pub const TEST_DEADLINE: Duration = Duration::from_secs(60);

/// Children killed when the parent's test ends for any reason, panics included, so that no
/// orphan keeps a port or a CPU.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub fn free_port() -> u16 {
    // The OS picks a free port; it is released for rank 0's store right after. Another process
    // could take it in between, which on a test machine is unlikely enough.
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// In a child: this rank's environment. In the parent: None.
pub fn child_env() -> Option<DistEnv> {
    let get = |k: &str| std::env::var(k).ok()?.parse::<usize>().ok();
    Some(DistEnv::local(
        get("CNX_DIST_TEST_RANK")?,
        get("CNX_DIST_TEST_WORLD")?,
        get("CNX_DIST_TEST_PORT")? as u16,
    ))
}

/// Runs `body` on `world` ranks, each in its own process, and checks they all succeed.
pub fn run_ranks(test: &str, world: usize, body: impl FnOnce(&DistEnv)) {
    if let Some(env) = child_env() {
        body(&env);
        return;
    }
    let port = free_port();
    let logs = std::env::temp_dir().join(format!("cnx-dist-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children = Children(Vec::new());
    let mut log_paths: Vec<PathBuf> = Vec::new();
    for rank in 0..world {
        let log = logs.join(format!("rank{rank}.log"));
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        log_paths.push(log);
        children.0.push(
            Command::new(&exe)
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env("CNX_DIST_TEST_RANK", rank.to_string())
                .env("CNX_DIST_TEST_WORLD", world.to_string())
                .env("CNX_DIST_TEST_PORT", port.to_string())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap(),
        );
    }
    let start = Instant::now();
    let mut statuses = vec![None; world];
    while statuses.iter().any(Option::is_none) {
        for (rank, c) in children.0.iter_mut().enumerate() {
            if statuses[rank].is_none() {
                statuses[rank] = c.try_wait().unwrap();
            }
        }
        if start.elapsed() > TEST_DEADLINE {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let failed: Vec<String> = statuses
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_some_and(|s| s.success()))
        .map(|(rank, s)| {
            let log = std::fs::read_to_string(&log_paths[rank]).unwrap_or_default();
            let status = s.map_or("still running at the deadline".to_string(), |s| {
                s.to_string()
            });
            format!("--- rank {rank}: {status}\n{log}")
        })
        .collect();
    drop(children);
    let _ = std::fs::remove_dir_all(&logs);
    assert!(
        failed.is_empty(),
        "{test}: ranks failed\n{}",
        failed.join("\n")
    );
}

pub fn join(env: &DistEnv) -> ProcessGroup {
    ProcessGroup::new(Backend::Gloo, env, PG_TIMEOUT).expect("joining the process group")
}
