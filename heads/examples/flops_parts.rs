//! FLOPs of each part of Mask R-CNN at 1280x800 (debugging the `cnx flops` count).
use cnx_backbone::flops::count;
use cnx_heads::structures::Rois;
use cnx_heads::{Detector, DetectorConfig};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn main() {
    let cfg = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
    let vs = VarStore::new(Device::Cpu);
    let det = Detector::new(&vs.root(), &cfg);
    let x = Tensor::zeros([1, 3, 1280, 800], (Kind::Float, Device::Cpu));
    tch::no_grad(|| {
        let (f, t) = count(|| det.backbone.forward_features(&x, false));
        println!("backbone {:.2}G", t.total / 1e9);
        let (feats, t) = count(|| det.neck.forward(&f));
        println!(
            "neck {:.2}G {:?}",
            t.total / 1e9,
            feats.iter().map(|f| f.size()).collect::<Vec<_>>()
        );
        let (_, t) = count(|| det.rpn.forward(&feats));
        println!("rpn {:.2}G", t.total / 1e9);
        let props = Tensor::randn([1000, 4], (Kind::Float, Device::Cpu));
        let rois = Rois::single(&props);
        let (_, t) = count(|| det.roi_head.forward_dummy(&feats, &rois));
        println!(
            "roi head (box + mask) {:.2}G {:?}",
            t.total / 1e9,
            t.by_kind
        );
    });
}
