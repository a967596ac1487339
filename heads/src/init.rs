//! mmdet's weight initialisation of the neck and heads (the backbone has its own): FPN convs
//! and the shared fcs Xavier-uniform, RPN convs normal(0.01), `fc_cls` normal(0.01), `fc_reg`
//! normal(0.001), mask-head convs / deconv / logits Kaiming-normal (fan_out, ReLU); biases 0.

use tch::Tensor;

fn fans(t: &Tensor) -> (i64, i64) {
    let s = t.size();
    let receptive: i64 = s[2..].iter().product();
    (s[1] * receptive, s[0] * receptive)
}

pub fn xavier_uniform(w: &Tensor, b: Option<&Tensor>) {
    let (fi, fo) = fans(w);
    let a = (6.0 / (fi + fo) as f64).sqrt();
    tch::no_grad(|| {
        let _ = w.shallow_clone().uniform_(-a, a);
    });
    zero(b);
}

pub fn normal(w: &Tensor, b: Option<&Tensor>, std: f64) {
    tch::no_grad(|| {
        let _ = w.shallow_clone().normal_(0.0, std);
    });
    zero(b);
}

/// Kaiming normal, mode fan_out, ReLU gain. `fan_out` as PyTorch computes it for the layer
/// (for ConvTranspose2d, whose weight is [cin, cout, k, k], that is size(0) * k * k).
pub fn kaiming_fan_out(w: &Tensor, b: Option<&Tensor>, fan_out: i64) {
    let std = (2.0 / fan_out as f64).sqrt();
    normal(w, b, std);
}

pub fn conv_fan_out(w: &Tensor) -> i64 {
    fans(w).1
}

fn zero(b: Option<&Tensor>) {
    if let Some(b) = b {
        tch::no_grad(|| {
            let _ = b.shallow_clone().zero_();
        });
    }
}
