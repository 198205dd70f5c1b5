//! `openims image`: local tools on image files (no server involved).

use clap::{Args, Subcommand};
use openims_format::inspect::{inspect, InspectOptions};
use openims_format::DiskFormat;
use std::path::PathBuf;

#[derive(Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Detect an image file's format and run every safety check; prints a JSON report.
    /// Exits with status 1 when the file is unsafe.
    Inspect {
        file: PathBuf,
        /// The format the file is claimed to be (a different detected format is a violation).
        #[arg(long = "format")]
        declared: Option<String>,
        /// Largest accepted virtual size in bytes.
        #[arg(long, default_value_t = 1 << 40)]
        max_virtual_size: u64,
        /// Only read headers, do not walk allocation tables.
        #[arg(long)]
        shallow: bool,
    },
}

pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    match args.cmd {
        ImageCmd::Inspect {
            file,
            declared,
            max_virtual_size,
            shallow,
        } => {
            let declared_format = match declared {
                Some(d) => Some(
                    DiskFormat::parse(&d).ok_or_else(|| anyhow::anyhow!("unknown format {d}"))?,
                ),
                None => None,
            };
            let f = std::fs::File::open(&file)
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", file.display()))?;
            let opts = InspectOptions {
                max_virtual_size,
                declared_format,
                deep: !shallow,
                ..InspectOptions::default()
            };
            let report = inspect(&f, &opts)?;
            let mut v = serde_json::to_value(&report)?;
            v["safe"] = serde_json::Value::Bool(report.is_safe());
            v["violations"] = serde_json::Value::Array(
                report
                    .violations
                    .iter()
                    .map(|x| serde_json::json!({"name": x.name(), "message": x.to_string()}))
                    .collect(),
            );
            println!("{}", serde_json::to_string_pretty(&v)?);
            if !report.is_safe() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
