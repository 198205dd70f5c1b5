//! Benchmark/driver binary: `convert IN OUT -O fmt [-c] [-f infmt]`.
//! Formats: raw, raw+bitmap, qcow2, vhd, vhd-fixed, vmdk.

use openims_format::convert::convert;
use openims_format::write::OutputFormat;
use openims_format::DiskFormat;
use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut paths = Vec::new();
    let mut out_fmt = None;
    let mut in_fmt = None;
    let mut compress = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "-O" => out_fmt = args.next().and_then(|s| OutputFormat::parse(&s)),
            "-f" => in_fmt = args.next().and_then(|s| DiskFormat::parse(&s)),
            "-c" => compress = true,
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let (Some(fmt), [input, output]) = (out_fmt, paths.as_slice()) else {
        eprintln!(
            "usage: convert IN OUT -O raw|raw+bitmap|qcow2|vhd|vhd-fixed|vmdk [-c] [-f infmt]"
        );
        std::process::exit(2);
    };
    match convert(input, in_fmt, output, fmt, compress, |_, _| {}) {
        Ok(r) => println!(
            "virtual {} output {} data {} zero-skipped {}",
            r.virtual_size, r.output_size, r.data_bytes, r.zero_bytes_skipped
        ),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
