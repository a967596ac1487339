//! mmcv's `ConvModule` as the official configs use it with `norm_cfg=BN`/`SyncBN`: conv without
//! bias, BatchNorm, ReLU. Shared by UperNet's heads and Cascade's 4conv1fc box heads.

use cnx_backbone::nn::{BatchNorm2d, Conv2d, ConvOpts};
use cnx_backbone::replica;
use tch::nn::{self, Module};
use tch::Tensor;

/// mmcv `ConvModule` with `norm_cfg=BN` and ReLU: `conv` (no bias) → `bn` → ReLU.
#[derive(Debug)]
pub struct ConvModule {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
}

impl ConvModule {
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, padding: i64) -> Self {
        let conv = Conv2d::new(
            &p / "conv",
            cin,
            cout,
            k,
            ConvOpts {
                padding,
                bias: false,
                ..Default::default()
            },
        );
        // mmcv ConvModule.init_weights: kaiming_init(mode='fan_out', nonlinearity='relu',
        // distribution='normal'); BN weight 1, bias 0 (tch's defaults already).
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        tch::no_grad(|| {
            let _ = conv.weight().shallow_clone().normal_(0.0, std);
        });
        Self {
            conv,
            bn: BatchNorm2d::new(&p / "bn", cout),
        }
    }

    /// `train` selects batch statistics (and running-stat updates) vs running statistics.
    /// ReLU in place, as mmcv's (BatchNorm's backward does not need its output). The official
    /// configs make this BN `SyncBN`: in training, a synchronized BatchNorm installed with
    /// [`cnx_backbone::replica::with_sync_batch_norm`] replaces the local one.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        replica::sync_batch_norm(&self.bn, &self.conv.forward(xs), train).relu_()
    }
}
