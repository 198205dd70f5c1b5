//! File-to-file conversion: sniff the input format, open its reader, write the output format
//! into a [`FileSink`].

use crate::read;
use crate::write::{write_image, OutputFormat, WriteOptions, WriteReport};
use crate::{DiskFormat, FileSink, ReadAt, Result};
use std::path::Path;
use std::sync::Arc;

/// Minimal magic sniff (not a safety inspection): qcow2, qcow, vhdx, vmdk, qed, vdi, vhd
/// (footer cookie at the end), LUKS; anything else is raw.
pub fn sniff(src: &dyn ReadAt) -> Result<DiskFormat> {
    let mut h = [0u8; 512];
    let size = src.size()?;
    read::read_or_zero(src, &mut h, 0)?;
    Ok(if &h[0..4] == b"QFI\xfb" {
        if read::be32(&h, 4) == 1 {
            DiskFormat::Qcow
        } else {
            DiskFormat::Qcow2
        }
    } else if &h[0..8] == b"vhdxfile" {
        DiskFormat::Vhdx
    } else if &h[0..4] == b"KDMV" || h.starts_with(b"# Disk DescriptorFile") {
        DiskFormat::Vmdk
    } else if &h[0..4] == b"QED\0" {
        DiskFormat::Qed
    } else if read::le32(&h, 64) == 0xbeda_107f {
        DiskFormat::Vdi
    } else if &h[0..6] == b"LUKS\xba\xbe" {
        DiskFormat::Luks
    } else {
        let mut f = [0u8; 8];
        if size >= 512 {
            read::read_or_zero(src, &mut f, size - 512)?;
        }
        if &f == b"conectix" || &h[0..8] == b"conectix" {
            DiskFormat::Vhd
        } else {
            DiskFormat::Raw
        }
    })
}

/// Converts `input` (format sniffed if `input_format` is `None`) to `output` as `out_fmt`.
/// `compress` applies to qcow2 (VMDK streamOptimized is always compressed). `progress` gets
/// (virtual bytes done, virtual size).
pub fn convert(
    input: &Path,
    input_format: Option<DiskFormat>,
    output: &Path,
    out_fmt: OutputFormat,
    compress: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<WriteReport> {
    let file = std::fs::File::open(input)?;
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            return Err(crate::FormatError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "output is the input file",
            )));
        }
    }
    let src: Arc<dyn ReadAt> = Arc::new(file);
    let fmt = match input_format {
        Some(f) => f,
        None => sniff(&*src)?,
    };
    let mut disk = read::open(src, fmt)?;
    let total = disk.virtual_size();
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(output)?;
    let mut sink = FileSink::unbounded(out);
    let opts = WriteOptions {
        compress,
        vmdk_extent_name: output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk.vmdk".into()),
        ..WriteOptions::default()
    };
    let report = write_image(&mut *disk, out_fmt, &opts, &mut sink, &mut |done| {
        progress(done, total)
    })?;
    if let Some(bm) = &report.bitmap {
        let mut p = output.as_os_str().to_owned();
        p.push(".bitmap");
        std::fs::write(p, bm)?;
    }
    Ok(report)
}
