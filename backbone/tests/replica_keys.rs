//! Drop path under batch keys: an image's keep/drop draws depend on (seed, iteration, its global
//! sample index, call site) only — not on which other images share its batch — and without
//! keys drop path still draws from libtorch's global generator.

use cnx_backbone::nn::drop_path;
use cnx_backbone::replica::{with_batch_keys, BatchKeys};
use tch::{Device, Kind, Tensor};

const CALLS: usize = 64;

/// Keep (true) / drop of each image at each of `CALLS` consecutive drop-path calls (sites
/// 0..CALLS) under the given keys: `out[call][image]`.
fn masks(seed: u64, iteration: u64, samples: &[u64]) -> Vec<Vec<bool>> {
    let n = samples.len() as i64;
    let x = Tensor::ones([n, 3, 4, 4], (Kind::Float, Device::Cpu));
    let keys = BatchKeys {
        seed,
        iteration,
        samples: samples.to_vec(),
    };
    with_batch_keys(keys, || {
        (0..CALLS)
            .map(|_| {
                let y = drop_path(&x, 0.5, true);
                // Kept samples are scaled by 1/keep = 2, dropped ones are 0.
                let per: Vec<f32> =
                    Vec::try_from(y.mean_dim(&[1i64, 2, 3][..], false, Kind::Float)).unwrap();
                per.iter()
                    .map(|&v| {
                        assert!(v == 0.0 || v == 2.0, "{v}");
                        v == 2.0
                    })
                    .collect()
            })
            .collect()
    })
}

fn column(m: &[Vec<bool>], image: usize) -> Vec<bool> {
    m.iter().map(|call| call[image]).collect()
}

#[test]
fn keyed_mask_follows_the_sample_not_the_batch() {
    let alone = column(&masks(11, 5, &[5]), 0);
    let batch = masks(11, 5, &[9, 0, 5, 17]);
    assert_eq!(
        alone,
        column(&batch, 2),
        "sample 5 alone vs third in a batch"
    );
    // Another sample in the same batch draws differently (2^-64 chance to coincide).
    assert_ne!(column(&batch, 2), column(&batch, 0));
    // Sites differ: the 64 calls are not one repeated draw (each call is a new site).
    assert!(
        alone.iter().any(|&k| k) && alone.iter().any(|&k| !k),
        "{alone:?}"
    );
    // Another iteration or seed gives other draws for the same sample.
    assert_ne!(alone, column(&masks(11, 6, &[5]), 0));
    assert_ne!(alone, column(&masks(12, 5, &[5]), 0));
    // Roughly the configured keep rate over all draws of the batch.
    let kept = batch.iter().flatten().filter(|&&k| k).count() as f64 / (4 * CALLS) as f64;
    assert!((kept - 0.5).abs() < 0.15, "{kept}");
}

#[test]
fn keyed_mask_at_one_site_matches_across_batches() {
    // Same site, sample 5 at different batch positions, by site number: site k of the lone
    // run equals site k of the batched run (not merely the same multiset of draws).
    let alone = masks(3, 0, &[5]);
    let batch = masks(3, 0, &[1, 2, 5]);
    for (k, (a, b)) in alone.iter().zip(&batch).enumerate() {
        assert_eq!(a[0], b[2], "site {k}");
    }
}

#[test]
fn without_keys_drop_path_uses_the_global_generator() {
    let x = Tensor::ones([64, 2], (Kind::Float, Device::Cpu));
    tch::manual_seed(42);
    let y = drop_path(&x, 0.3, true);
    tch::manual_seed(42);
    let want = Tensor::empty([64, 1], (Kind::Float, Device::Cpu)).bernoulli_float_(0.7);
    let want = &x * want / 0.7;
    assert!(y.equal(&want));
    // Eval mode and p = 0 draw nothing and return the input.
    assert!(drop_path(&x, 0.3, false).equal(&x));
    assert!(drop_path(&x, 0.0, true).equal(&x));
}
