//! `cnx config show PRESET`: print a preset's full configuration as TOML (edit it and pass it to
//! `cnx train --config FILE`); `cnx config check FILE` validates an edited file.

use crate::cmd::train::resolve_config;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Print the full config of a preset (or of a file) as TOML, after --set overrides.
    Show {
        /// Preset name (see `cnx presets`).
        preset: Option<String>,
        #[arg(long, conflicts_with = "preset")]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Parse and validate a config file (unknown keys and wrong types are errors).
    Check { file: PathBuf },
}

pub fn run(args: Args) -> Result<()> {
    match args.action {
        Action::Show {
            preset,
            config,
            sets,
        } => {
            let cfg = resolve_config(preset.as_deref(), config.as_ref(), &sets)?;
            print!("{}", cfg.to_toml()?);
        }
        Action::Check { file } => {
            let cfg = resolve_config(None, Some(&file), &[])?;
            println!("{}: ok ({})", file.display(), cfg.name);
        }
    }
    Ok(())
}
