//! Oracle tests against qemu-img / qemu-io (skipped with a message if qemu-img is missing).
//!
//! Readers: for images qemu-img makes in every supported format, our reader's disk equals
//! `qemu-img convert -O raw` of the same file. Writers: every file our writers produce passes
//! `qemu-img check` (where qemu supports it) and `qemu-img compare` against the source.

use openims_format::convert::convert;
use openims_format::io::{ExtentKind, ReadAt};
use openims_format::read;
use openims_format::write::{write_bitmap, AllocationBitmap, OutputFormat};
use openims_format::DiskFormat;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img not installed: oracle tests skipped");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A raw file of an odd size (not a multiple of any cluster) with a mix of holes, written
/// zeros, random, constant and half-random 64 KiB blocks.
fn make_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; 65536];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(65536) as usize;
        match rng.next() % 6 {
            0 | 1 => {}
            2 => {
                buf.fill(0);
                f.write_all_at(&buf[..n], off).unwrap();
            }
            3 => {
                rng.fill(&mut buf);
                f.write_all_at(&buf[..n], off).unwrap();
            }
            4 => {
                buf.fill((off >> 16) as u8 | 1);
                f.write_all_at(&buf[..n], off).unwrap();
            }
            _ => {
                rng.fill(&mut buf);
                buf[n / 2..].fill(0);
                f.write_all_at(&buf[..n], off).unwrap();
            }
        }
        off += n as u64;
    }
}

fn qemu_fmt(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Vhd => "vpc",
        other => other.as_str(),
    }
}

/// Our reader -> raw (sparse) must equal qemu-img's view of `src`.
fn check_reader(dir: &Path, src: &Path, fmt: DiskFormat, bytewise: bool) {
    check_reader_vs(dir, src, fmt, bytewise, (src, fmt));
}

/// Like `check_reader`, comparing with `reference` (an image qemu converted `src` from, for
/// formats whose qemu driver has no fast block status, e.g. 20 GiB VHDX).
fn check_reader_vs(
    dir: &Path,
    src: &Path,
    fmt: DiskFormat,
    bytewise: bool,
    reference: (&Path, DiskFormat),
) {
    let ours = dir.join(format!(
        "{}.ours.raw",
        src.file_name().unwrap().to_string_lossy()
    ));
    let r = convert(src, None, &ours, OutputFormat::Raw, false, |_, _| {}).unwrap();
    let info = run(
        "qemu-img",
        &["info", "--output=json", "-f", qemu_fmt(fmt), s(src)],
    );
    let want = format!("\"virtual-size\": {}", r.virtual_size);
    assert!(
        info.contains(&want),
        "virtual size of {src:?}: ours {} vs {info}",
        r.virtual_size
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            qemu_fmt(reference.1),
            s(&ours),
            s(reference.0),
        ],
    );
    if bytewise {
        let theirs = dir.join("theirs.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                qemu_fmt(fmt),
                "-O",
                "raw",
                s(src),
                s(&theirs),
            ],
        );
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{src:?} differs"
        );
    }
    // extents() must be consistent with the data: Zero extents read as zeros.
    let file = std::fs::File::open(src).unwrap();
    let mut disk = read::open(Arc::new(file) as Arc<dyn ReadAt>, fmt).unwrap();
    let vs = disk.virtual_size();
    let ext = disk.extents(0, vs).unwrap();
    assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), vs);
    let raw = std::fs::File::open(&ours).unwrap();
    let mut buf = vec![0u8; 65536];
    for e in ext.iter().filter(|e| e.kind == ExtentKind::Zero).take(64) {
        let n = e.len.min(65536) as usize;
        raw.read_exact_at(&mut buf[..n], e.offset).unwrap();
        assert!(
            buf[..n].iter().all(|&b| b == 0),
            "Zero extent with data in {src:?}"
        );
    }
}

/// Every writer on `src`: qemu-img check (qcow2, vmdk) and compare against the source.
fn check_writers(dir: &Path, src: &Path, fmt: DiskFormat) {
    let outs: &[(OutputFormat, bool, &str, &str)] = &[
        (OutputFormat::Raw, false, "raw", "raw"),
        (OutputFormat::RawWithBitmap, false, "raw", "bmraw"),
        (OutputFormat::Qcow2, false, "qcow2", "qcow2"),
        (OutputFormat::Qcow2, true, "qcow2", "c.qcow2"),
        (OutputFormat::Vhd, false, "vpc", "vhd"),
        (OutputFormat::VhdFixed, false, "vpc", "fixed.vhd"),
        (OutputFormat::VmdkStream, false, "vmdk", "vmdk"),
    ];
    let stem = src.file_name().unwrap().to_string_lossy().into_owned();
    for &(of, c, qf, ext) in outs {
        let out = dir.join(format!("{stem}.w.{ext}"));
        let r = convert(src, Some(fmt), &out, of, c, |_, _| {}).unwrap();
        if qf == "qcow2" || qf == "vmdk" {
            run("qemu-img", &["check", "-q", "-f", qf, s(&out)]);
        }
        run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                qemu_fmt(fmt),
                "-F",
                qf,
                s(src),
                s(&out),
            ],
        );
        if of == OutputFormat::RawWithBitmap {
            let bm = AllocationBitmap::from_bytes(r.bitmap.as_deref().unwrap()).unwrap();
            let raw = std::fs::File::open(&out).unwrap();
            let mut buf = vec![0u8; bm.granularity() as usize];
            for i in 0..bm.len() {
                let n = raw.read_at(&mut buf, i * bm.granularity()).unwrap();
                if !bm.get(i) {
                    assert!(buf[..n].iter().all(|&b| b == 0), "clear bit {i} over data");
                }
            }
            let file = std::fs::File::open(src).unwrap();
            let mut disk = read::open(Arc::new(file) as Arc<dyn ReadAt>, fmt).unwrap();
            assert_eq!(write_bitmap(&mut *disk, 16).unwrap(), bm.to_bytes());
        }
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(std::env::var("OIMS_TEST_TMP").unwrap_or_else(|_| "/tmp".into())).unwrap()
}

fn qemu_convert(base: &Path, out: &Path, fmt: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    args.extend_from_slice(extra);
    args.push(s(base));
    args.push(s(out));
    run("qemu-img", &args);
    out.to_path_buf()
}

const ODD_SIZE: u64 = (41 << 20) + 7 * 512;

#[test]
fn readers_match_qemu_on_format_matrix() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let dir = d.path();
    let base = dir.join("base.raw");
    make_raw(&base, ODD_SIZE, 0x1234_5678_9abc_def1);
    let cases: Vec<(PathBuf, DiskFormat)> = vec![
        (base.clone(), DiskFormat::Raw),
        (
            qemu_convert(
                &base,
                &dir.join("v2.qcow2"),
                "qcow2",
                &["-o", "compat=0.10"],
            ),
            DiskFormat::Qcow2,
        ),
        (
            qemu_convert(&base, &dir.join("v3.qcow2"), "qcow2", &["-o", "compat=1.1"]),
            DiskFormat::Qcow2,
        ),
        (
            qemu_convert(
                &base,
                &dir.join("c16k.qcow2"),
                "qcow2",
                &["-o", "cluster_size=16384"],
            ),
            DiskFormat::Qcow2,
        ),
        (
            qemu_convert(&base, &dir.join("zlib.qcow2"), "qcow2", &["-c"]),
            DiskFormat::Qcow2,
        ),
        (
            qemu_convert(
                &base,
                &dir.join("zstd.qcow2"),
                "qcow2",
                &["-c", "-o", "compression_type=zstd"],
            ),
            DiskFormat::Qcow2,
        ),
        (
            qemu_convert(&base, &dir.join("dyn.vhd"), "vpc", &[]),
            DiskFormat::Vhd,
        ),
        (
            qemu_convert(
                &base,
                &dir.join("fixed.vhd"),
                "vpc",
                &["-o", "subformat=fixed"],
            ),
            DiskFormat::Vhd,
        ),
        (
            qemu_convert(&base, &dir.join("dyn.vhdx"), "vhdx", &[]),
            DiskFormat::Vhdx,
        ),
        (
            qemu_convert(
                &base,
                &dir.join("fixed.vhdx"),
                "vhdx",
                &["-o", "subformat=fixed"],
            ),
            DiskFormat::Vhdx,
        ),
        (
            qemu_convert(&base, &dir.join("sparse.vmdk"), "vmdk", &[]),
            DiskFormat::Vmdk,
        ),
        (
            qemu_convert(&base, &dir.join("dyn.vdi"), "vdi", &[]),
            DiskFormat::Vdi,
        ),
        (
            qemu_convert(&base, &dir.join("static.vdi"), "vdi", &["-o", "static=on"]),
            DiskFormat::Vdi,
        ),
        (
            qemu_convert(
                &base,
                &dir.join("stream.vmdk"),
                "vmdk",
                &["-o", "subformat=streamOptimized"],
            ),
            DiskFormat::Vmdk,
        ),
    ];
    for (p, f) in &cases {
        check_reader(dir, p, *f, true);
    }
}

#[test]
fn qemu_io_zero_clusters_and_small_disks() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let dir = d.path();
    for (name, size, compat) in [
        ("z3.qcow2", "9M", "1.1"),
        ("z2.qcow2", "9M", "0.10"),
        ("one.qcow2", "1M", "1.1"),
    ] {
        let p = dir.join(name);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                s(&p),
                size,
            ],
        );
        run(
            "qemu-io",
            &[
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "write -P 0xcd 300k 5k",
                "-c",
                "write -z 200k 64k",
                s(&p),
            ],
        );
        if size == "9M" {
            run(
                "qemu-io",
                &[
                    "-c",
                    "write -P 0xab 1M 64k",
                    "-c",
                    "write -z 2M 1M",
                    "-c",
                    "write -P 0x11 8M 100k",
                    s(&p),
                ],
            );
        }
        check_reader(dir, &p, DiskFormat::Qcow2, true);
        check_writers(dir, &p, DiskFormat::Qcow2);
    }
}

#[test]
fn writers_pass_check_and_compare() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let dir = d.path();
    let base = dir.join("wbase.raw");
    make_raw(&base, ODD_SIZE - 3 * 512, 0xfeed_beef_1234_5679);
    check_writers(dir, &base, DiskFormat::Raw);
    let z = qemu_convert(&base, &dir.join("wsrc.qcow2"), "qcow2", &["-c"]);
    check_writers(dir, &z, DiskFormat::Qcow2);
}

#[test]
fn large_sparse_20g() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let dir = d.path();
    let p = dir.join("big.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "20G"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -P 0x5a 10G 1M",
            "-c",
            "write -P 0x77 20479M 1M",
            s(&p),
        ],
    );
    check_reader(dir, &p, DiskFormat::Qcow2, false);
    let vx = dir.join("big.vhdx");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "vhdx", s(&p), s(&vx)],
    );
    check_reader_vs(dir, &vx, DiskFormat::Vhdx, false, (&p, DiskFormat::Qcow2));
    let vm = dir.join("big.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&p),
            s(&vm),
        ],
    );
    check_reader(dir, &vm, DiskFormat::Vmdk, false);
    check_writers(dir, &p, DiskFormat::Qcow2);
}

/// A slotted qcow2 (metadata first, then each allocated slot copied unchanged) passes
/// `qemu-img check` and equals its source: several L2 tables and refcount blocks (512-byte
/// clusters), a last slot and a last cluster cut short by the disk's end (not even a whole
/// sector), no slot at all. The streaming qcow2 writer is checked on the same disks.
#[test]
fn slotted_qcow2_passes_check_and_compare() {
    use openims_format::write::SlottedQcow2;
    use std::os::unix::fs::FileExt as _;
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let cases: &[(u64, u64, u64, u64)] = &[
        // (virtual size, cluster size, slot size, seed)
        ((1 << 20) + 777, 512, 4096, 11),
        ((20 << 20) + 1000, 65536, 4 << 20, 12),
        (3 << 20, 65536, 1 << 20, 13),
    ];
    for &(vsize, cs, slot, seed) in cases {
        for empty in [false, true] {
            let src = dir.path().join(format!("slot-{seed}-{empty}.raw"));
            if empty {
                std::fs::File::create(&src).unwrap().set_len(vsize).unwrap();
            } else {
                make_raw(&src, vsize, seed);
            }
            let raw = std::fs::File::open(&src).unwrap();
            let mut buf = vec![0u8; slot as usize];
            let mut allocated = Vec::new();
            for k in 0..vsize.div_ceil(slot) {
                let n = ReadAt::read_at(&raw, &mut buf, k * slot).unwrap();
                if buf[..n].iter().any(|&b| b != 0) {
                    allocated.push(k);
                }
            }
            let layout = SlottedQcow2::new(vsize, cs, slot, &allocated, 0, u64::MAX)
                .unwrap()
                .unwrap();
            assert_eq!(layout.metadata.len() as u64 % slot, 0);
            let out = dir.path().join(format!("slot-{seed}-{empty}.qcow2"));
            let f = std::fs::File::create(&out).unwrap();
            f.write_all_at(&layout.metadata, 0).unwrap();
            let mut at = layout.metadata.len() as u64;
            for &k in &allocated {
                let want = layout.data_len(k) as usize;
                buf.fill(0);
                let _ = ReadAt::read_at(&raw, &mut buf[..want], k * slot).unwrap();
                f.write_all_at(&buf[..want], at).unwrap();
                at += slot;
            }
            drop(f);
            // The streaming writer on the same disk (sizes that are not whole sectors).
            let streamed = dir.path().join(format!("slot-{seed}-{empty}.w.qcow2"));
            convert(
                &src,
                Some(DiskFormat::Raw),
                &streamed,
                OutputFormat::Qcow2,
                false,
                |_, _| {},
            )
            .unwrap();
            for q in [&out, &streamed] {
                run("qemu-img", &["check", "-q", "-f", "qcow2", s(q)]);
                run(
                    "qemu-img",
                    &["compare", "-f", "raw", "-F", "qcow2", s(&src), s(q)],
                );
            }
        }
    }
    // Bad layouts are refused, not written.
    assert!(SlottedQcow2::new(1 << 20, 65536, 3 << 16, &[0], 0, u64::MAX).is_err());
    assert!(SlottedQcow2::new(1 << 20, 65536, 1 << 16, &[2, 1], 0, u64::MAX).is_err());
    assert!(SlottedQcow2::new(1 << 20, 65536, 1 << 16, &[16], 0, u64::MAX).is_err());
    assert!(SlottedQcow2::new(1 << 30, 65536, 1 << 16, &[0], 0, 1 << 16)
        .unwrap()
        .is_none());
}
