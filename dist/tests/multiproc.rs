//! Multi-process tests of the collectives on Gloo over 127.0.0.1, one process per rank (see
//! `common/mod.rs` for how the ranks are spawned).

mod common;

use std::time::{Duration, Instant};

use cnx_dist::{broadcast_parameters, Backend, DistEnv, GradBuckets, ProcessGroup};
use common::{free_port, join, run_ranks};
use tch::{Device, Kind, Tensor};

/// Each rank's contribution in the all-reduce tests: distinct per rank and per element.
fn rank_values(rank: usize, kind: Kind) -> Tensor {
    (Tensor::arange(6, (Kind::Float, Device::Cpu)) * (rank as f64 + 1.0) + rank as f64 * 10.0)
        .to_kind(kind)
        .reshape([2, 3])
}

fn check_all_reduce(env: &DistEnv) {
    let pg = join(env);
    assert_eq!((pg.rank(), pg.world_size()), (env.rank, env.world_size));
    for kind in [Kind::Float, Kind::Double, Kind::Int64, Kind::Int] {
        let expected_sum = (0..env.world_size)
            .map(|r| rank_values(r, kind))
            .reduce(|a, b| a + b)
            .unwrap();
        let t = rank_values(env.rank, kind);
        // A non-contiguous one too (goes through a staging copy).
        let nc = rank_values(env.rank, kind).tr();
        pg.all_reduce_sum(&[t.shallow_clone(), nc.shallow_clone()])
            .unwrap();
        assert_eq!(t, expected_sum, "sum of {kind:?}");
        assert_eq!(nc, expected_sum.tr(), "sum of transposed {kind:?}");

        let t = rank_values(env.rank, kind);
        pg.all_reduce_mean(std::slice::from_ref(&t)).unwrap();
        let w = env.world_size as i64;
        let expected_mean = if matches!(kind, Kind::Float | Kind::Double) {
            &expected_sum / w as f64
        } else {
            expected_sum.f_div_scalar_mode(w, "trunc").unwrap()
        };
        assert_eq!(t, expected_mean, "mean of {kind:?}");
    }
    pg.barrier().unwrap();
}

#[test]
fn all_reduce_two_ranks() {
    run_ranks("all_reduce_two_ranks", 2, check_all_reduce);
}

#[test]
fn all_reduce_three_ranks() {
    run_ranks("all_reduce_three_ranks", 3, check_all_reduce);
}

#[test]
fn broadcast_from_rank_zero() {
    run_ranks("broadcast_from_rank_zero", 2, |env| {
        let pg = join(env);
        let a = Tensor::full([3, 4], env.rank as f64 + 1.0, (Kind::Float, Device::Cpu));
        let b = Tensor::full([5], env.rank as i64 * 7 + 3, (Kind::Int64, Device::Cpu));
        pg.broadcast(&[a.shallow_clone(), b.shallow_clone()], 0)
            .unwrap();
        assert_eq!(a, Tensor::full([3, 4], 1.0, (Kind::Float, Device::Cpu)));
        assert_eq!(b, Tensor::full([5], 3, (Kind::Int64, Device::Cpu)));
        // And from the other root.
        let c = Tensor::from_slice(&[env.rank as f32]);
        pg.broadcast(std::slice::from_ref(&c), 1).unwrap();
        assert_eq!(c, Tensor::from_slice(&[1f32]));
        assert!(pg.broadcast(std::slice::from_ref(&c), 2).is_err());
    });
}

#[test]
fn all_gather_bytes_of_different_lengths() {
    run_ranks("all_gather_bytes_of_different_lengths", 3, |env| {
        let pg = join(env);
        let payload = |r: usize| -> Vec<u8> { (0..r * 5).map(|i| (i * 31 + r) as u8).collect() };
        let gathered = pg.all_gather_bytes(&payload(env.rank)).unwrap();
        assert_eq!(gathered, (0..3).map(payload).collect::<Vec<_>>());
        // All empty: the payload round is skipped on every rank alike.
        assert_eq!(pg.all_gather_bytes(&[]).unwrap(), vec![Vec::<u8>::new(); 3]);
    });
}

#[test]
fn grad_buckets_average_gradients() {
    run_ranks("grad_buckets_average_gradients", 2, |env| {
        let pg = join(env);
        let shapes: [&[i64]; 5] = [&[4, 3], &[3], &[2, 2, 2], &[7], &[5]];
        // Same initial weights are not needed for the gradient check, but are broadcast anyway
        // to cover broadcast_parameters on requires-grad leaves.
        let params: Vec<Tensor> = shapes
            .iter()
            .map(|s| {
                Tensor::full(*s, env.rank as f64, (Kind::Float, Device::Cpu))
                    .set_requires_grad(true)
            })
            .collect();
        broadcast_parameters(&pg, &params).unwrap();
        for p in &params {
            assert_eq!(p.sum(Kind::Float).double_value(&[]), 0.0);
        }
        // Rank r's gradient of parameter i: (i + 1) * (r + 1) * x, with x = 1..numel. The last
        // parameter is left out of the loss, so it has no gradient (on every rank).
        let grad_of = |i: usize, r: usize| {
            Tensor::arange(params[i].numel() as i64, (Kind::Float, Device::Cpu)).reshape(shapes[i])
                * ((i + 1) * (r + 1)) as f64
        };
        let loss = (0..4)
            .map(|i| (&params[i] * grad_of(i, env.rank)).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap();
        loss.backward();
        assert!(!params[4].grad().defined());
        // Rank 1 also lacks the gradient of parameter 3 (it would, e.g., skip a branch):
        // it must still join the collectives and end with the average.
        if env.rank == 1 {
            let _ = params[3].grad().zero_();
        }

        // A 40-byte cap: several buckets, one parameter larger than the cap.
        let buckets = GradBuckets::with_bucket_bytes(&params, 40);
        assert!(buckets.num_buckets() >= 3, "{:?}", buckets.bucket_members());
        let members = buckets.bucket_members();
        assert_eq!(
            members.concat(),
            vec![4, 3, 2, 1, 0],
            "reverse order, each once"
        );
        buckets.all_reduce_grads(&pg).unwrap();

        for (i, p) in params.iter().enumerate().take(4) {
            let rank3 = |r: usize| {
                if i == 3 && r == 1 {
                    grad_of(i, r) * 0.0
                } else {
                    grad_of(i, r)
                }
            };
            let expected = (rank3(0) + rank3(1)) / 2.0;
            assert_eq!(p.grad(), expected, "parameter {i}");
        }
        // No rank had a gradient for parameter 4: it now has a zero one, the same everywhere.
        assert_eq!(
            params[4].grad(),
            Tensor::zeros([5], (Kind::Float, Device::Cpu))
        );
        // The default cap puts everything in one bucket.
        assert_eq!(GradBuckets::new(&params).num_buckets(), 1);
    });
}

#[test]
fn grad_buckets_fill_a_missing_grad_with_the_average() {
    run_ranks(
        "grad_buckets_fill_a_missing_grad_with_the_average",
        2,
        |env| {
            let pg = join(env);
            let p = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            // Only rank 0 computes a gradient.
            if env.rank == 0 {
                (&p * Tensor::from_slice(&[2f32, 4., 6.]))
                    .sum(Kind::Float)
                    .backward();
            }
            GradBuckets::new(std::slice::from_ref(&p))
                .all_reduce_grads(&pg)
                .unwrap();
            assert_eq!(p.grad(), Tensor::from_slice(&[1f32, 2., 3.]));
        },
    );
}

#[test]
fn dead_peer_is_an_error_not_a_hang() {
    run_ranks("dead_peer_is_an_error_not_a_hang", 2, |env| {
        let timeout = Duration::from_secs(5);
        let pg = ProcessGroup::new(Backend::Gloo, env, timeout).unwrap();
        pg.barrier().unwrap();
        if env.rank == 1 {
            // Dies without any clean-up, as a crashed rank would.
            std::process::exit(0);
        }
        let start = Instant::now();
        let t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
        // The peer's sockets closed when it exited: Gloo fails at once (at the latest, the
        // collective would time out).
        let err = pg
            .all_reduce_sum(std::slice::from_ref(&t))
            .expect_err("all_reduce with a dead peer must fail");
        let elapsed = start.elapsed();
        eprintln!("rank 0 got, after {elapsed:?}: {err}");
        assert!(
            elapsed < timeout + Duration::from_secs(5),
            "took {elapsed:?}"
        );
        // Dropping the group after the failure must not hang either.
        drop(pg);
    });
}

#[test]
fn backend_names() {
    assert_eq!("gloo".parse::<Backend>().unwrap(), Backend::Gloo);
    assert_eq!("NCCL".parse::<Backend>().unwrap(), Backend::Nccl);
    assert!("mpi".parse::<Backend>().is_err());
    assert_eq!(Backend::for_device(Device::Cpu), Backend::Gloo);
    assert_eq!(Backend::for_device(Device::Cuda(1)), Backend::Nccl);
    assert!(Backend::Gloo.is_available());
}

#[test]
fn silent_peer_times_out() {
    run_ranks("silent_peer_times_out", 2, |env| {
        let timeout = Duration::from_secs(2);
        let pg = ProcessGroup::new(Backend::Gloo, env, timeout).unwrap();
        pg.barrier().unwrap();
        if env.rank == 1 {
            // Alive but never joining the collective (a rank stuck elsewhere), then a normal
            // shutdown although rank 0 is gone by then.
            std::thread::sleep(timeout * 2);
            drop(pg);
            return;
        }
        let start = Instant::now();
        let t = Tensor::ones([10], (Kind::Float, Device::Cpu));
        let err = pg
            .all_reduce_sum(std::slice::from_ref(&t))
            .expect_err("all_reduce with a silent peer must time out");
        let elapsed = start.elapsed();
        eprintln!("rank 0 got, after {elapsed:?}: {err}");
        assert!(
            elapsed >= timeout / 2 && elapsed < timeout * 3,
            "took {elapsed:?}"
        );
    });
}

#[test]
fn missing_peer_fails_the_rendezvous() {
    run_ranks("missing_peer_fails_the_rendezvous", 2, |env| {
        if env.rank == 1 {
            return; // never joins
        }
        let start = Instant::now();
        let timeout = Duration::from_secs(2);
        let err = ProcessGroup::new(Backend::Gloo, env, timeout)
            .expect_err("joining without the other rank must fail");
        let elapsed = start.elapsed();
        eprintln!("rank 0 got, after {elapsed:?}: {err}");
        assert!(elapsed < timeout * 3, "took {elapsed:?}");
    });
}

/// Without a GPU, asking for NCCL is an error (from c10d when NCCL is compiled in, from the shim's
/// stub otherwise), never a crash.
#[test]
fn nccl_without_gpu_is_an_error() {
    if tch::Cuda::is_available() {
        return;
    }
    let env = DistEnv::local(0, 1, free_port());
    let err = ProcessGroup::new(Backend::Nccl, &env, Duration::from_secs(2))
        .expect_err("NCCL without a GPU");
    eprintln!("{err}");
}
