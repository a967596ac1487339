//! The CPU's Winograd 3x3 convolutions (`cnx_dist::ops::winograd_conv3x3`) inside a whole model,
//! against mmsegmentation's own UperNet: with every plain 3x3 layer forced through the kernel
//! (not only where it pays), the fixtures' logits and training losses still agree within the
//! parity tests' bounds. The kernel is installed process-wide, so these tests live in their own
//! binary.

mod common;

use cnx_backbone::nn::{set_conv3x3_kernel, Conv2d, ConvOpts};
use common::segmentation_fixture::{check, check_forward_train};
use tch::nn::{Module, VarStore};
use tch::{Device, Kind, Tensor};

fn force_winograd() {
    set_conv3x3_kernel(Some(|x, w| {
        Some(cnx_dist::ops::winograd_conv3x3(x, w).expect("winograd"))
    }));
}

#[test]
fn upernet_whole_inference_matches_mmseg_with_winograd() {
    force_winograd();
    check("whole");
}

#[test]
fn upernet_training_losses_match_mmseg_with_winograd() {
    force_winograd();
    check_forward_train();
}

#[test]
fn layers_with_bias_and_other_shapes() {
    force_winograd();
    let vs = VarStore::new(Device::Cpu);
    let plain = Conv2d::new(
        vs.root() / "a",
        8,
        5,
        3,
        ConvOpts {
            padding: 1,
            ..Default::default()
        },
    );
    let strided = Conv2d::new(
        vs.root() / "b",
        8,
        5,
        3,
        ConvOpts {
            padding: 1,
            stride: 2,
            ..Default::default()
        },
    );
    tch::no_grad(|| {
        let _ = plain.bias().unwrap().shallow_clone().uniform_(-1.0, 1.0);
    });
    let x = Tensor::randn([2, 8, 11, 9], (Kind::Float, Device::Cpu));
    // Through the kernel (bias added after it) vs libtorch's convolution of the same layer.
    let (ours, direct) = (plain.forward(&x), plain.inner.forward(&x));
    let err = (&ours - &direct).abs().max().double_value(&[]);
    assert!(err > 0.0, "the 3x3 layer did not go through the kernel");
    assert!(
        err < 1e-4 * direct.abs().max().double_value(&[]),
        "error {err}"
    );
    // A strided layer is not a kernel's to take: bitwise libtorch's result.
    assert!(strided.forward(&x).equal(&strided.inner.forward(&x)));
}

#[test]
fn leaves_cpu_autocast_to_libtorch() {
    use cnx_backbone::autocast::{with_autocast, DeviceType};
    let x = Tensor::zeros([1, 256, 64, 64], (Kind::Float, Device::Cpu));
    let w = Tensor::zeros([256, 256, 3, 3], (Kind::Float, Device::Cpu));
    let under = with_autocast(DeviceType::Cpu, true, || {
        cnx_dist::ops::winograd_where_it_pays(&x, &w)
    });
    assert!(under.is_none(), "computed in float under CPU autocast");
    assert!(cnx_dist::ops::winograd_where_it_pays(&x, &w).is_some());
}
