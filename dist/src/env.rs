//! Who am I in a multi-process job: rank, world size and rendezvous address, read from the
//! variables torchrun or SLURM's srun set for each process.
//!
//! torchrun's variables win over SLURM's, so `srun torchrun ...` (one torchrun per node) works:
//! SLURM then only describes the torchrun agents, not the workers.

use crate::error::{DistError, Result};

/// The rendezvous port when `MASTER_PORT` is not set (torch.distributed's default too).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher's variables described this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun / torch.distributed.run (or any launcher setting `WORLD_SIZE` and `RANK`).
    Torchrun,
    /// SLURM (`srun`), one task per device.
    Slurm,
}

/// This process's place in a multi-process job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this node: the CUDA device index to use.
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    /// Host of rank 0, where the TCPStore listens.
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's `TORCHELASTIC_RESTART_COUNT` (0 on the first attempt or under SLURM).
    pub restart_count: u32,
    pub launcher: Launcher,
    /// torchrun's agent already serves the TCPStore at MASTER_ADDR:MASTER_PORT
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank joins it as a client, under the prefix
    /// `/worker/attempt_{restart_count}` so a restarted group does not read the last attempt's
    /// keys (what torch.distributed's `env://` rendezvous does).
    pub agent_store: bool,
}

impl DistEnv {
    /// Reads the process environment; `Ok(None)` for a single-process run.
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Same as [`DistEnv::from_env`] with the variables looked up through `var` (for tests, or
    /// to overlay command-line settings). Empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let get = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if get("WORLD_SIZE").is_some() {
            Self::torchrun(&get)
        } else if get("SLURM_NTASKS").is_some() || get("SLURM_PROCID").is_some() {
            Self::slurm(&get)
        } else {
            Ok(None)
        }
    }

    /// A single-node job of `world_size` processes on 127.0.0.1 (tests, local launches).
    pub fn local(rank: usize, world_size: usize, master_port: u16) -> DistEnv {
        DistEnv {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            master_addr: "127.0.0.1".to_string(),
            master_port,
            restart_count: 0,
            launcher: Launcher::Torchrun,
            agent_store: false,
        }
    }

    /// True for the process that should log, save checkpoints and gather results.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn torchrun(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        // A one-process torchrun job (which always names its master) still gets its group: the
        // NCCL/Gloo path is then the same as with more processes. A bare WORLD_SIZE=1 is a
        // single-process run.
        let world_size = parse_count(get, "WORLD_SIZE")?;
        if world_size == 1 && get("MASTER_ADDR").is_none() {
            return Ok(None);
        }
        let rank = parse_required(get, "RANK")?;
        check_below(rank, world_size, "RANK", "WORLD_SIZE")?;
        // Launchers other than torchrun may set only the global variables: then the job is
        // taken to be on one node.
        let local_rank = parse_opt(get, "LOCAL_RANK")?.unwrap_or(rank);
        let local_world_size = parse_opt(get, "LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
        if local_world_size == 0 {
            return Err(DistError::env("LOCAL_WORLD_SIZE", "must be at least 1"));
        }
        check_below(
            local_rank,
            local_world_size,
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
        )?;
        let restart_count = match get("TORCHELASTIC_RESTART_COUNT") {
            Some(v) => v.parse().map_err(|_| {
                DistError::env(
                    "TORCHELASTIC_RESTART_COUNT",
                    format!("{v:?} is not a non-negative integer"),
                )
            })?,
            None => 0,
        };
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr: master_addr(get)?,
            master_port: master_port(get)?,
            restart_count,
            launcher: Launcher::Torchrun,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
        }))
    }

    fn slurm(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let world_size = parse_count(get, "SLURM_NTASKS")?;
        if world_size == 1 {
            return Ok(None);
        }
        let rank = parse_required(get, "SLURM_PROCID")?;
        check_below(rank, world_size, "SLURM_PROCID", "SLURM_NTASKS")?;
        let local_rank = parse_required(get, "SLURM_LOCALID")?;
        let local_world_size = slurm_local_world_size(get)?;
        check_below(
            local_rank,
            local_world_size,
            "SLURM_LOCALID",
            "the tasks per node",
        )?;
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr: master_addr(get)?,
            master_port: master_port(get)?,
            restart_count: 0,
            launcher: Launcher::Slurm,
            agent_store: false,
        }))
    }
}

fn parse_opt(get: &dyn Fn(&str) -> Option<String>, var: &str) -> Result<Option<usize>> {
    get(var)
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| DistError::env(var, format!("{v:?} is not a non-negative integer")))
        })
        .transpose()
}

fn parse_required(get: &dyn Fn(&str) -> Option<String>, var: &str) -> Result<usize> {
    parse_opt(get, var)?.ok_or_else(|| DistError::env(var, "is not set"))
}

fn parse_count(get: &dyn Fn(&str) -> Option<String>, var: &str) -> Result<usize> {
    match parse_required(get, var)? {
        0 => Err(DistError::env(var, "must be at least 1")),
        n => Ok(n),
    }
}

fn check_below(value: usize, bound: usize, var: &str, bound_name: &str) -> Result<()> {
    if value < bound {
        Ok(())
    } else {
        Err(DistError::env(
            var,
            format!("{value} is not below {bound_name} ({bound})"),
        ))
    }
}

/// `SLURM_NTASKS_PER_NODE` (set only with `--ntasks-per-node`) or this node's entry of
/// `SLURM_TASKS_PER_NODE` (always set; compressed as in `2(x3),1`, indexed by `SLURM_NODEID`).
fn slurm_local_world_size(get: &dyn Fn(&str) -> Option<String>) -> Result<usize> {
    if get("SLURM_NTASKS_PER_NODE").is_some() {
        return parse_count(get, "SLURM_NTASKS_PER_NODE");
    }
    let Some(spec) = get("SLURM_TASKS_PER_NODE") else {
        return Err(DistError::env(
            "SLURM_TASKS_PER_NODE",
            "is not set (nor SLURM_NTASKS_PER_NODE)",
        ));
    };
    let node = parse_opt(get, "SLURM_NODEID")?.unwrap_or(0);
    let counts = expand_tasks_per_node(&spec)
        .map_err(|reason| DistError::env("SLURM_TASKS_PER_NODE", reason))?;
    counts.get(node).copied().ok_or_else(|| {
        DistError::env(
            "SLURM_NODEID",
            format!(
                "node {node} is not in SLURM_TASKS_PER_NODE={spec:?} ({} nodes)",
                counts.len()
            ),
        )
    })
}

/// `2(x3),1` -> `[2, 2, 2, 1]`.
fn expand_tasks_per_node(spec: &str) -> std::result::Result<Vec<usize>, String> {
    let bad = || format!("{spec:?} is not of the form 2(x3),1");
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (count, times) = match part.split_once("(x") {
            Some((c, rest)) => {
                let times = rest.strip_suffix(')').ok_or_else(bad)?;
                (c, times.parse::<usize>().map_err(|_| bad())?)
            }
            None => (part, 1),
        };
        let count = count.parse::<usize>().map_err(|_| bad())?;
        if count == 0 {
            return Err(bad());
        }
        out.resize(out.len() + times, count);
    }
    Ok(out)
}

fn master_addr(get: &dyn Fn(&str) -> Option<String>) -> Result<String> {
    if let Some(addr) = get("MASTER_ADDR") {
        return Ok(addr);
    }
    for var in ["SLURM_JOB_NODELIST", "SLURM_NODELIST"] {
        if let Some(list) = get(var) {
            let hosts = expand_nodelist(&list).map_err(|reason| DistError::env(var, reason))?;
            return hosts
                .into_iter()
                .next()
                .ok_or_else(|| DistError::env(var, "names no host"));
        }
    }
    Err(DistError::env(
        "MASTER_ADDR",
        "is not set and there is no SLURM_JOB_NODELIST to take the first host from",
    ))
}

fn master_port(get: &dyn Fn(&str) -> Option<String>) -> Result<u16> {
    match get("MASTER_PORT") {
        None => Ok(DEFAULT_MASTER_PORT),
        Some(v) => match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(DistError::env(
                "MASTER_PORT",
                format!("{v:?} is not a port number (1-65535)"),
            )),
        },
    }
}

/// Expands a SLURM host list: `node[01-03,07],gpu-a` -> `node01 node02 node03 node07 gpu-a`.
/// Zero padding is kept as written; several bracket groups in one name multiply out.
pub fn expand_nodelist(list: &str) -> std::result::Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    // Split on commas outside brackets.
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("{list:?}: unbalanced ']'"))?
            }
            ',' if depth == 0 => {
                expand_host(&list[start..i], &mut hosts).map_err(|e| format!("{list:?}: {e}"))?;
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("{list:?}: unbalanced '['"));
    }
    expand_host(&list[start..], &mut hosts).map_err(|e| format!("{list:?}: {e}"))?;
    Ok(hosts)
}

fn expand_host(expr: &str, out: &mut Vec<String>) -> std::result::Result<(), String> {
    let expr = expr.trim();
    if expr.is_empty() {
        return Err("empty host name".to_string());
    }
    let Some(open) = expr.find('[') else {
        out.push(expr.to_string());
        return Ok(());
    };
    let close = open + expr[open..].find(']').ok_or("unbalanced '['")?;
    let (prefix, ranges, suffix) = (&expr[..open], &expr[open + 1..close], &expr[close + 1..]);
    for range in ranges.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let bad = || format!("bad range {range:?}");
        let (a, b) = (
            lo.parse::<u64>().map_err(|_| bad())?,
            hi.parse::<u64>().map_err(|_| bad())?,
        );
        if a > b || b - a > 100_000 {
            return Err(bad());
        }
        for n in a..=b {
            // The rest may hold more bracket groups: expand it recursively.
            expand_host(
                &format!("{prefix}{n:0width$}{suffix}", width = lo.len()),
                out,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| map.get(k).cloned())
    }

    fn env_error_var(r: Result<Option<DistEnv>>) -> String {
        match r {
            Err(DistError::Env { var, .. }) => var,
            other => panic!("expected an environment error, got {other:?}"),
        }
    }

    const TORCHRUN: &[(&str, &str)] = &[
        ("RANK", "5"),
        ("LOCAL_RANK", "1"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29400"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ];

    #[test]
    fn single_process_is_none() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        // torchrun --nproc-per-node 1 (a master named) joins a one-rank group.
        let one = parse(&[
            ("WORLD_SIZE", "1"),
            ("RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((one.world_size, one.agent_store), (1, true));
        assert_eq!(
            parse(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")]).unwrap(),
            None
        );
        // Unrelated SLURM variables (an interactive allocation) do not make a job distributed.
        assert_eq!(parse(&[("SLURM_JOB_ID", "42")]).unwrap(), None);
    }

    #[test]
    fn torchrun_vars() {
        let e = parse(TORCHRUN).unwrap().unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                local_world_size: 4,
                master_addr: "10.0.0.1".into(),
                master_port: 29400,
                restart_count: 2,
                launcher: Launcher::Torchrun,
                agent_store: false,
            }
        );
        assert!(!e.is_main());
    }

    #[test]
    fn torchrun_wins_over_slurm() {
        let mut vars = TORCHRUN.to_vec();
        vars.extend([
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_JOB_NODELIST", "other[1-2]"),
        ]);
        let e = parse(&vars).unwrap().unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.launcher),
            (5, 8, Launcher::Torchrun)
        );
        assert_eq!(e.master_addr, "10.0.0.1");
    }

    #[test]
    fn torchrun_defaults() {
        let e = parse(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h")])
            .unwrap()
            .unwrap();
        assert_eq!((e.local_rank, e.local_world_size), (1, 2));
        assert_eq!(e.master_port, DEFAULT_MASTER_PORT);
        assert_eq!(e.restart_count, 0);
    }

    #[test]
    fn slurm_vars() {
        let e = parse(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "6"),
            ("SLURM_LOCALID", "2"),
            ("SLURM_TASKS_PER_NODE", "4(x2)"),
            ("SLURM_NODEID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[007-008]"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 6,
                world_size: 8,
                local_rank: 2,
                local_world_size: 4,
                master_addr: "gpu007".into(),
                master_port: 29500,
                restart_count: 0,
                launcher: Launcher::Slurm,
                agent_store: false,
            }
        );
        // MASTER_ADDR / MASTER_PORT override the nodelist and the default port.
        let e = parse(&[
            ("SLURM_NTASKS", "3"),
            ("SLURM_PROCID", "0"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NTASKS_PER_NODE", "3"),
            ("SLURM_NODELIST", "a,b"),
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.master_addr.as_str(), e.master_port), ("head", 1234));
        assert_eq!(e.local_world_size, 3);
        // Uneven nodes: the last node has 1 task.
        let e = parse(&[
            ("SLURM_NTASKS", "5"),
            ("SLURM_PROCID", "4"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_TASKS_PER_NODE", "2(x2),1"),
            ("SLURM_NODEID", "2"),
            ("SLURM_NODELIST", "gpu-a,gpu-b,gpu-c"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.local_world_size, e.master_addr.as_str()), (1, "gpu-a"));
    }

    #[test]
    fn nodelist_expansion() {
        assert_eq!(
            expand_nodelist("node[01-04,07]").unwrap(),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(expand_nodelist("gpu-a,gpu-b").unwrap(), ["gpu-a", "gpu-b"]);
        assert_eq!(
            expand_nodelist("a[9-10],b,c[1]").unwrap(),
            ["a9", "a10", "b", "c1"]
        );
        assert_eq!(
            expand_nodelist("r[1-2]n[1-2]").unwrap(),
            ["r1n1", "r1n2", "r2n1", "r2n2"]
        );
        assert_eq!(expand_nodelist("single").unwrap(), ["single"]);
        for bad in ["node[1-", "node]1[", "node[a-b]", "node[3-1]", "a,,b", ""] {
            assert!(expand_nodelist(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn malformed_values_name_the_variable() {
        let with = |k: &'static str, v: &'static str| {
            let mut vars: Vec<_> = TORCHRUN.iter().filter(|(n, _)| *n != k).copied().collect();
            vars.push((k, v));
            env_error_var(parse(&vars))
        };
        assert_eq!(with("WORLD_SIZE", "two"), "WORLD_SIZE");
        assert_eq!(with("WORLD_SIZE", "0"), "WORLD_SIZE");
        assert_eq!(with("RANK", "-1"), "RANK");
        assert_eq!(with("RANK", "8"), "RANK");
        assert_eq!(with("LOCAL_RANK", "x"), "LOCAL_RANK");
        assert_eq!(with("LOCAL_RANK", "4"), "LOCAL_RANK");
        assert_eq!(with("MASTER_PORT", "70000"), "MASTER_PORT");
        assert_eq!(with("MASTER_PORT", "0"), "MASTER_PORT");
        assert_eq!(
            with("TORCHELASTIC_RESTART_COUNT", "1.5"),
            "TORCHELASTIC_RESTART_COUNT"
        );
        assert_eq!(
            env_error_var(parse(&[("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")])),
            "RANK"
        );
        assert_eq!(
            env_error_var(parse(&[("WORLD_SIZE", "2"), ("RANK", "0")])),
            "MASTER_ADDR"
        );
        let slurm = [
            ("SLURM_NTASKS", "4"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_TASKS_PER_NODE", "2(x2)"),
        ];
        let with_slurm = |extra: &[(&'static str, &'static str)]| {
            let mut vars = slurm.to_vec();
            vars.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
            vars.extend_from_slice(extra);
            env_error_var(parse(&vars))
        };
        assert_eq!(
            with_slurm(&[("SLURM_JOB_NODELIST", "n[1-")]),
            "SLURM_JOB_NODELIST"
        );
        assert_eq!(
            with_slurm(&[("SLURM_NODELIST", "n1"), ("SLURM_TASKS_PER_NODE", "2(x")]),
            "SLURM_TASKS_PER_NODE"
        );
        assert_eq!(
            with_slurm(&[("SLURM_NODELIST", "n1"), ("SLURM_NODEID", "5")]),
            "SLURM_NODEID"
        );
        assert_eq!(
            with_slurm(&[("SLURM_NODELIST", "n1"), ("SLURM_PROCID", "")]),
            "SLURM_PROCID"
        );
        assert_eq!(
            with_slurm(&[("SLURM_NODELIST", "n1"), ("SLURM_NTASKS", "many")]),
            "SLURM_NTASKS"
        );
    }
}
