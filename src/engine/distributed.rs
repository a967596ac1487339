//! Data-parallel training and evaluation across processes, on torch.distributed's own c10d
//! process groups (`cnx-dist`: NCCL for CUDA devices, Gloo for the CPU).
//!
//! One process per device, launched by torchrun (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ...),
//! by SLURM (`SLURM_PROCID`, ...) or by `cnx train --nproc-per-node N` ([`spawn_local`]). Every
//! rank builds the same model, receives rank 0's parameters and buffers, trains on its slice of
//! each global batch (the loader's `replicas`/`rank`), and averages gradients after backward;
//! rank 0 alone writes checkpoints, logs and plots. Loss values, the non-finite check and a
//! Ctrl-C are agreed on by all ranks each iteration, so every rank takes the same decisions.

use anyhow::{anyhow, bail, Context, Result};
use cnx_dist::{Backend, DistEnv, GradBuckets, ProcessGroup};
use std::rc::Rc;
use std::time::Duration;
use tch::{nn, Device, Kind, Tensor};

/// How long a collective may wait for the other ranks (rank 0 evaluating while the others wait
/// at the next step included): torch.distributed's default, or `CNX_DIST_TIMEOUT` seconds.
fn timeout() -> Duration {
    let secs = std::env::var("CNX_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1800);
    Duration::from_secs(secs.max(1))
}

/// This process's place in a data-parallel run and its process group.
pub struct DataParallel {
    pub env: DistEnv,
    pub pg: Rc<ProcessGroup>,
    buckets: Option<GradBuckets>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DataParallel(rank {} of {}, {})",
            self.env.rank,
            self.env.world_size,
            self.pg.backend()
        )
    }
}

/// The device of a rank: `auto` / `cuda` mean this node's `cuda:LOCAL_RANK` (one process per
/// GPU), `cuda:N` is taken as given, `cpu` stays the CPU.
pub fn rank_device(spec: &str, env: &DistEnv) -> Result<Device> {
    use crate::device::Spec;
    let cuda = crate::device::cuda_device_count();
    let spec = match crate::device::parse_spec(spec)? {
        Spec::Auto if cuda > 0 => Spec::Cuda(env.local_rank),
        Spec::Cuda(0) if spec.trim() == "cuda" => Spec::Cuda(env.local_rank),
        s => s,
    };
    crate::device::select(spec, cuda)
}

impl DataParallel {
    /// Join the run the environment describes (`None` when this is a single-process run).
    /// `backend`: `--dist-backend`, else NCCL for CUDA devices and Gloo for the CPU.
    pub fn from_env(backend: Option<&str>, device: Device) -> Result<Option<DataParallel>> {
        let Some(env) = DistEnv::from_env()? else {
            return Ok(None);
        };
        let backend = match backend {
            Some(b) => b
                .parse::<Backend>()
                .map_err(|e| anyhow!("--dist-backend: {e}"))?,
            None => Backend::for_device(device),
        };
        if backend == Backend::Nccl && !device.is_cuda() {
            bail!("the NCCL backend needs CUDA devices; use --dist-backend gloo for the CPU");
        }
        let pg = ProcessGroup::new(backend, &env, timeout()).with_context(|| {
            format!(
                "rank {} of {}: joining the process group at {}:{} ({backend})",
                env.rank, env.world_size, env.master_addr, env.master_port
            )
        })?;
        Ok(Some(DataParallel {
            env,
            pg: Rc::new(pg),
            buckets: None,
        }))
    }

    pub fn rank(&self) -> usize {
        self.env.rank
    }

    pub fn world(&self) -> usize {
        self.env.world_size
    }

    pub fn is_main(&self) -> bool {
        self.env.rank == 0
    }

    fn context(&self, what: &str) -> String {
        format!(
            "rank {} of {}: {what} (another rank failed or stopped; its own message names the \
             cause)",
            self.env.rank, self.env.world_size
        )
    }

    /// Every variable (parameters and buffers) of `vs` set to rank 0's values, so all replicas
    /// start identical whatever their initialisation drew.
    pub fn broadcast_state(&self, vs: &nn::VarStore) -> Result<()> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let ts: Vec<Tensor> = vars.into_iter().map(|(_, t)| t.detach()).collect();
        tch::no_grad(|| self.pg.broadcast(&ts, 0)).with_context(|| self.context("broadcast"))
    }

    /// Average the gradients of `params` (the optimizer's trainable parameters, in the same
    /// order on every rank) over the ranks, in ~25 MB buckets.
    pub fn average_gradients(&mut self, params: &[Tensor]) -> Result<()> {
        let buckets = self.buckets.get_or_insert_with(|| GradBuckets::new(params));
        buckets
            .all_reduce_grads(&self.pg)
            .with_context(|| format!("rank {}: gradient all-reduce", self.env.rank))
    }

    /// The mean over the ranks of each value (loss terms for the log; a non-finite value on any
    /// rank makes the mean non-finite everywhere, so every rank takes the same decision).
    pub fn mean(&self, vals: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(vals)
            .to_kind(Kind::Double)
            .to_device(self.pg.device());
        self.pg
            .all_reduce_sum(std::slice::from_ref(&t))
            .with_context(|| self.context("loss all-reduce"))?;
        let s = Vec::<f64>::try_from(t.to_device(Device::Cpu))?;
        Ok(s.into_iter().map(|v| v / self.world() as f64).collect())
    }

    /// True on every rank when `flag` is true on any (a Ctrl-C seen by one process stops all
    /// at the same iteration).
    pub fn any(&self, flag: bool) -> Result<bool> {
        Ok(self.mean(&[flag as u8 as f64])?[0] > 0.0)
    }

    pub fn barrier(&self) -> Result<()> {
        self.pg.barrier().with_context(|| self.context("barrier"))
    }

    /// Every rank's bytes, in rank order (evaluation results gathered for rank 0).
    pub fn gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.pg
            .all_gather_bytes(bytes)
            .with_context(|| self.context("gathering results"))
    }
}

/// The device of this process: [`rank_device`] when the environment describes a data-parallel
/// rank, else the one `--device` rule.
pub fn resolve_device(spec: &str) -> Result<Device> {
    match DistEnv::from_env()? {
        Some(e) => rank_device(spec, &e),
        None => crate::device::resolve(spec),
    }
}

/// `--nproc-per-node N` of `train` and `test`: `None` when this process is a rank (or N is 1)
/// and should run the command itself; otherwise it is the launcher, which runs the ranks
/// ([`spawn_local`]) and returns how they ended.
pub fn launch_local(n: usize, port: Option<u16>, max_restarts: u32) -> Option<Result<()>> {
    if n <= 1 || std::env::var_os("CNX_LAUNCHED").is_some() {
        return None;
    }
    Some(match DistEnv::from_env() {
        Err(e) => Err(e.into()),
        Ok(Some(_)) => Err(anyhow!(
            "--nproc-per-node inside a torchrun / SLURM job: let the launcher start the ranks"
        )),
        Ok(None) => spawn_local(n, port, max_restarts),
    })
}

/// `cnx train --nproc-per-node N [--max-restarts R]`: run this same command line as N local
/// ranks (torchrun's variables, master 127.0.0.1:`port`, a fresh free port per attempt unless
/// given), wait, and stop them all as soon as one fails, naming the rank and its exit status.
/// With restarts left the group starts again with `--resume auto` (added when the command has no
/// `--resume`), continuing from the last complete checkpoint, as `torchrun --max-restarts` does
/// for a command that resumes. Ctrl-C reaches every rank (same process group), which save and
/// stop together; this process only waits for them.
pub fn spawn_local(n: usize, port: Option<u16>, max_restarts: u32) -> Result<()> {
    // The ranks handle Ctrl-C; the launcher must outlive them to report.
    let _ = ctrlc::set_handler(|| {});
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    for attempt in 0..=max_restarts {
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        match run_group(n, port, &args, attempt)? {
            None => return Ok(()),
            Some((rank, why)) if attempt < max_restarts => {
                eprintln!(
                    "rank {rank} of {n} failed ({why}); the other ranks were stopped; restarting \
                     the group from the last complete checkpoint (restart {} of {max_restarts})",
                    attempt + 1
                );
                if !args
                    .iter()
                    .any(|a| a == "--resume" || a.starts_with("--resume="))
                {
                    args.extend(["--resume".to_string(), "auto".to_string()]);
                }
            }
            Some((rank, why)) => bail!(
                "rank {rank} of {n} failed ({why}); the other ranks were stopped{}. The last \
                 complete checkpoint in the work dir is intact: continue with --resume auto",
                if max_restarts > 0 {
                    format!(" (after {max_restarts} restarts)")
                } else {
                    String::new()
                }
            ),
        }
    }
    unreachable!("the last attempt returns")
}

/// One attempt: the ranks' first failure (rank, how), or `None` when all succeeded. Exits 130
/// when the ranks stopped for a Ctrl-C.
fn run_group(
    n: usize,
    port: u16,
    args: &[String],
    attempt: u32,
) -> Result<Option<(usize, String)>> {
    use std::process::{Child, Command};
    let exe = std::env::current_exe().context("locating the cnx binary")?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for rank in 0..n {
        let child = Command::new(&exe)
            .args(args)
            .env("TORCHELASTIC_RESTART_COUNT", attempt.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("CNX_LAUNCHED", "1")
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push((rank, child));
    }
    let mut failed: Option<(usize, String)> = None;
    let mut codes: Vec<Option<std::process::ExitStatus>> = vec![None; n];
    while codes.iter().any(Option::is_none) {
        // Ranks that ended in this pass; when several failed together (one died, the others
        // lost their peer), the one killed by a signal is the cause, else the first.
        let mut ended: Vec<(usize, std::process::ExitStatus)> = Vec::new();
        for (rank, c) in children.iter_mut() {
            if codes[*rank].is_none() {
                if let Ok(Some(st)) = c.try_wait() {
                    codes[*rank] = Some(st);
                    ended.push((*rank, st));
                }
            }
        }
        if failed.is_none() {
            use std::os::unix::process::ExitStatusExt;
            let bad = || {
                ended
                    .iter()
                    .filter(|(_, st)| !st.success() && st.code() != Some(130))
            };
            failed = bad()
                .find(|(_, st)| st.signal().is_some())
                .or_else(|| bad().next())
                .map(|&(rank, st)| (rank, describe_exit(st)));
        }
        if failed.is_some() {
            // One rank is gone: the others cannot finish a step; stop them now rather than at
            // their next collective's timeout.
            for (rank, c) in children.iter_mut() {
                if codes[*rank].is_none() {
                    terminate(c);
                    codes[*rank] = c.try_wait().ok().flatten();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let interrupted = codes.iter().any(|c| c.and_then(|s| s.code()) == Some(130));
    match failed {
        Some(f) => Ok(Some(f)),
        None if interrupted => std::process::exit(130),
        None => Ok(None),
    }
}
fn describe_exit(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown exit".into(),
    }
}

/// SIGTERM, then SIGKILL after a grace period.
fn terminate(c: &mut std::process::Child) {
    let pid = c.id() as i32;
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe {
        libc_kill(pid, 15);
    }
    for _ in 0..50 {
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A free TCP port on 127.0.0.1 for a local run's store.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Maps this rank's padded (H, W) to the global batch's.
type ShapeAgreement = dyn Fn([i64; 2]) -> [i64; 2];

thread_local! {
    static BATCH_SHAPE: std::cell::RefCell<Option<Rc<ShapeAgreement>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the ranks agreeing on each training batch's padded shape: `agree` maps this
/// rank's (H, W) to the largest over the ranks. A single process pads a global batch to its
/// largest image; ranks that padded only their own slice would see other zeros at the borders
/// (and other features), so each rank pads its slice to the global batch's shape.
pub fn with_batch_shape_agreement<R>(
    agree: impl Fn([i64; 2]) -> [i64; 2] + 'static,
    f: impl FnOnce() -> R,
) -> R {
    let prev = BATCH_SHAPE.with(|c| c.replace(Some(Rc::new(agree))));
    let out = f();
    BATCH_SHAPE.with(|c| *c.borrow_mut() = prev);
    out
}

/// The padded (H, W) of a training batch whose own padded shape is `local`: the global batch's
/// under [`with_batch_shape_agreement`], else `local`.
pub fn agreed_batch_shape(local: [i64; 2]) -> [i64; 2] {
    let agree = BATCH_SHAPE.with(|c| c.borrow().clone());
    agree.map_or(local, |a| a(local))
}

impl DataParallel {
    /// This rank's share of a sharded evaluation (results gathered over the group).
    pub fn eval_shard(&self) -> crate::evaluation::Shard {
        let pg = self.pg.clone();
        let rank = self.env.rank;
        crate::evaluation::Shard::new(rank, self.env.world_size, move |b: &[u8]| {
            pg.all_gather_bytes(b)
                .with_context(|| format!("rank {rank}: gathering evaluation results"))
        })
    }

    /// The closure for [`with_batch_shape_agreement`]: the element-wise max over the ranks.
    pub fn shape_agreement(&self) -> impl Fn([i64; 2]) -> [i64; 2] + 'static {
        let pg = self.pg.clone();
        move |hw: [i64; 2]| {
            let mut bytes = Vec::with_capacity(16);
            bytes.extend_from_slice(&hw[0].to_le_bytes());
            bytes.extend_from_slice(&hw[1].to_le_bytes());
            let all = pg
                .all_gather_bytes(&bytes)
                .unwrap_or_else(|e| panic!("batch shape all-gather: {e}"));
            all.iter().fold(hw, |m, b| {
                let h = i64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
                let w = i64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
                [m[0].max(h), m[1].max(w)]
            })
        }
    }
}
