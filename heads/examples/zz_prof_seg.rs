use cnx_heads::segmentor::{Segmentor, SegmentorConfig};
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};

fn main() {
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let mut cfg = SegmentorConfig::upernet_convnext("tiny").unwrap();
    let _ = &mut cfg;
    let vs = VarStore::new(Device::Cpu);
    let seg = Segmentor::new(&vs.root(), &cfg).unwrap();
    let x = Tensor::randn([2, 3, 512, 512], (Kind::Float, Device::Cpu));
    let lab = Tensor::randint(150, [2, 512, 512], (Kind::Int64, Device::Cpu));
    for it in 0..3 {
        let t = Instant::now();
        let feats = seg.extract_feat(&x, true);
        let t_bb = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let logits = seg.decode_head.forward_t(&feats, true);
        let t_dec = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let l = cnx_heads::upernet::seg_cross_entropy(&logits, &lab, 255, false);
        let t_loss = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _a = cnx_heads::upernet::seg_accuracy(&logits, &lab, 255, false);
        let t_acc = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let aux = seg.auxiliary_head.as_ref().unwrap().forward_t(&feats, true);
        let l2 = cnx_heads::upernet::seg_cross_entropy(&aux, &lab, 255, false);
        let t_aux = t.elapsed().as_secs_f64();
        let t = Instant::now();
        (l + l2 * 0.4).backward();
        let t_bwd = t.elapsed().as_secs_f64();
        println!("it {it}: backbone {t_bb:.3} decode {t_dec:.3} loss {t_loss:.3} acc {t_acc:.3} aux+loss {t_aux:.3} backward {t_bwd:.3}");
        for (_, v) in vs.variables() { let mut g = v.grad(); if g.defined() { let _ = g.zero_(); } }
    }
}
