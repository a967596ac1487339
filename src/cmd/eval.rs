//! `cnx eval`: COCO mAP and segmentation mIoU from files on disk. The command line lives in
//! `cnx_eval::cli` so that `cnx eval` and the libtorch-free `cnx-eval` binary are one
//! implementation; this module only re-exports it for `cnx`'s subcommand table.

pub use cnx_eval::cli::{run, Args, CocoArgs, EvalCommand, IouTypeArg, SegArgs};
