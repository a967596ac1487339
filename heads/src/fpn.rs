//! mmdet's FPN neck: 1x1 lateral convs, top-down nearest upsampling to the finer map's exact
//! size, 3x3 output convs, and extra levels by `max_pool2d(kernel 1, stride 2)` of the last
//! output (`add_extra_convs=False`). Keys `lateral_convs.{i}.conv.*`, `fpn_convs.{i}.conv.*`.

use cnx_backbone::nn::{Conv2d, ConvOpts};
use tch::nn::{Module, Path};
use tch::Tensor;

#[derive(Debug)]
pub struct Fpn {
    lateral: Vec<Conv2d>,
    output: Vec<Conv2d>,
    num_outs: usize,
}

impl Fpn {
    pub fn new(p: &Path, in_channels: &[i64], out_channels: i64, num_outs: usize) -> Self {
        let lateral = in_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                Conv2d::new(
                    p / "lateral_convs" / i / "conv",
                    c,
                    out_channels,
                    1,
                    ConvOpts::default(),
                )
            })
            .collect();
        let output = (0..in_channels.len())
            .map(|i| {
                Conv2d::new(
                    p / "fpn_convs" / i / "conv",
                    out_channels,
                    out_channels,
                    3,
                    ConvOpts {
                        padding: 1,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let s = Self {
            lateral,
            output,
            num_outs,
        };
        for c in s.lateral.iter().chain(&s.output) {
            crate::init::xavier_uniform(c.weight(), c.bias());
        }
        s
    }

    pub fn forward(&self, inputs: &[Tensor]) -> Vec<Tensor> {
        let mut lats: Vec<Tensor> = self
            .lateral
            .iter()
            .zip(inputs)
            .map(|(l, x)| l.forward(x))
            .collect();
        for i in (1..lats.len()).rev() {
            let s = lats[i - 1].size();
            let up = lats[i].upsample_nearest2d([s[2], s[3]], None, None);
            lats[i - 1] = &lats[i - 1] + up;
        }
        let mut outs: Vec<Tensor> = self
            .output
            .iter()
            .zip(&lats)
            .map(|(c, x)| c.forward(x))
            .collect();
        while outs.len() < self.num_outs {
            let last = outs.last().expect("at least one level");
            outs.push(last.max_pool2d([1, 1], [2, 2], [0, 0], [1, 1], false));
        }
        outs
    }
}
