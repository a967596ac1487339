//! Backbones for dense prediction: ConvNeXt (the paper's), Swin and ResNet/ResNeXt (the
//! comparison rows), checkpoint loading for the formats people have, and parameter / FLOP
//! counting from the real model.

pub mod autocast;
pub mod checkpoint;
pub mod config;
pub mod convnext;
pub mod dense;
pub mod flops;
pub mod nn;
pub mod replica;
pub mod resnet;
pub mod roadmap;
pub mod swin;
