//! `openims image`: local tools on image files (inspect, convert), and the sharing commands
//! that talk to a running service (`share`, `unshare`, `accept`, `reject`, `shared-with-me`;
//! see `share_cmd`).

use clap::{Args, Subcommand};
use openims_format::convert::convert;
use openims_format::inspect::{inspect, InspectOptions};
use openims_format::write::OutputFormat;
use openims_format::DiskFormat;
use std::path::PathBuf;

#[derive(Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Share images with projects or whole domains (owner; batch_add_members, waits for the job).
    Share(crate::share_cmd::MembersArgs),
    /// Stop sharing images with projects or domains (owner; batch_delete_members).
    Unshare(crate::share_cmd::MembersArgs),
    /// Accept images shared with your project (recipient; batch_update_members).
    Accept(crate::share_cmd::AnswerArgs),
    /// Reject images shared with your project (recipient; batch_update_members).
    Reject(crate::share_cmd::AnswerArgs),
    /// Images shared with your project, with the state of each share.
    SharedWithMe(crate::share_cmd::SharedWithMeArgs),
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
    /// Convert an image file to another format (the input is inspected first; unsafe files
    /// are refused). Formats: raw, raw+bitmap, qcow2, vhd, vhd-fixed, vmdk (streamOptimized).
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Output format.
        #[arg(short = 'O', long = "output-format")]
        output_format: String,
        /// Input format (detected when omitted).
        #[arg(short = 'f', long = "input-format")]
        input_format: Option<String>,
        /// Compress the output (qcow2; vmdk is always compressed).
        #[arg(short = 'c', long)]
        compress: bool,
        /// No progress bar.
        #[arg(short = 'q', long)]
        quiet: bool,
    },
}

pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    match args.cmd {
        ImageCmd::Share(a) => crate::share_cmd::share(a),
        ImageCmd::Unshare(a) => crate::share_cmd::unshare(a),
        ImageCmd::Accept(a) => crate::share_cmd::answer(a, "accepted"),
        ImageCmd::Reject(a) => crate::share_cmd::answer(a, "rejected"),
        ImageCmd::SharedWithMe(a) => crate::share_cmd::shared_with_me(a),
        ImageCmd::Convert {
            input,
            output,
            output_format,
            input_format,
            compress,
            quiet,
        } => {
            let out_fmt = OutputFormat::parse(&output_format)
                .ok_or_else(|| anyhow::anyhow!("unknown output format {output_format}"))?;
            let declared = match input_format {
                Some(f) => Some(
                    DiskFormat::parse(&f).ok_or_else(|| anyhow::anyhow!("unknown format {f}"))?,
                ),
                None => None,
            };
            let f = std::fs::File::open(&input)
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", input.display()))?;
            let report = inspect(
                &f,
                &InspectOptions {
                    declared_format: declared,
                    ..InspectOptions::default()
                },
            )?;
            if !report.is_safe() {
                let why: Vec<String> = report
                    .violations
                    .iter()
                    .map(|v| format!("{}: {v}", v.name()))
                    .collect();
                anyhow::bail!(
                    "{} refused by the safety checks: {}",
                    input.display(),
                    why.join("; ")
                );
            }
            let fmt = if report.format == DiskFormat::Iso {
                DiskFormat::Raw
            } else {
                report.format
            };
            let bar = if quiet {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new(report.virtual_size)
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )?
                .progress_chars("=> "),
            );
            let started = std::time::Instant::now();
            let r = convert(
                &input,
                Some(fmt),
                &output,
                out_fmt,
                compress,
                |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                },
            )?;
            bar.finish_and_clear();
            if let Some(bitmap) = &r.bitmap {
                let mut p = output.clone().into_os_string();
                p.push(".bitmap");
                std::fs::write(&p, bitmap)?;
            }
            if !quiet {
                eprintln!(
                    "converted {} ({}) -> {} ({}): {} virtual, {} data, {} written in {:.2}s",
                    input.display(),
                    fmt,
                    output.display(),
                    output_format,
                    r.virtual_size,
                    r.data_bytes,
                    r.output_size,
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
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
