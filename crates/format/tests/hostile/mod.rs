//! Hostile-file corpus generator.
//!
//! [`write_corpus`] writes, into a directory, image files that must each be refused by
//! `inspect`, plus `expected.json`: an array of `{file, expected, declared_format,
//! description}` where `expected` lists violation names that must all be reported. Helper
//! files (backing files, flat extents, sources) go to `DIR/support/` and are not part of the
//! corpus. Uses `qemu-img` for realistic bases and byte patches for the rest.
//!
//! Run it from the shell with `scripts/make-hostile-corpus.sh DIR`.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::util::{make_source_raw, qemu_img, vmdk_stream_with_footer, MIB};

/// One corpus file and what `inspect` must say about it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostileCase {
    /// File name inside the corpus directory.
    pub file: String,
    /// Violation names that must all be reported.
    pub expected: Vec<String>,
    /// Format to declare when inspecting / uploading (None = not declared).
    pub declared_format: Option<String>,
    /// What the file is.
    pub description: String,
}

struct Gen {
    dir: PathBuf,
    sup: PathBuf,
    cases: Vec<HostileCase>,
}

fn rd(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn put(b: &mut [u8], o: usize, v: &[u8]) {
    b[o..o + v.len()].copy_from_slice(v);
}

/// On-disk bytes of a Microsoft GUID string.
fn guid_bytes(s: &str) -> [u8; 16] {
    let h: String = s.chars().filter(|c| *c != '-').collect();
    let mut b = [0u8; 16];
    for (i, x) in b.iter_mut().enumerate() {
        *x = u8::from_str_radix(&h[i * 2..i * 2 + 2], 16).unwrap();
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

fn vhd_fix(b: &mut [u8], off: usize, len: usize, ck: usize) {
    put(b, off + ck, &[0; 4]);
    let sum: u32 = b[off..off + len]
        .iter()
        .fold(0u32, |a, &c| a.wrapping_add(u32::from(c)));
    put(b, off + ck, &(!sum).to_be_bytes());
}

fn crc32c_fix(b: &mut [u8], off: usize, len: usize) {
    put(b, off + 4, &[0; 4]);
    let c = crc32c::crc32c(&b[off..off + len]);
    put(b, off + 4, &c.to_le_bytes());
}

impl Gen {
    fn sup(&self, name: &str) -> String {
        self.sup.join(name).to_str().unwrap().to_string()
    }
    fn out(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn add(&mut self, file: &str, expected: &[&str], declared: Option<&str>, description: &str) {
        assert!(
            self.out(file).exists(),
            "corpus file {file} was not written"
        );
        self.cases.push(HostileCase {
            file: file.into(),
            expected: expected.iter().map(|s| s.to_string()).collect(),
            declared_format: declared.map(str::to_string),
            description: description.into(),
        });
    }
    fn write(&self, name: &str, data: &[u8]) {
        std::fs::write(self.out(name), data).unwrap();
    }
    /// A qemu-img-made support file, returned as bytes.
    fn qemu(&self, name: &str, args: &[&str]) -> Vec<u8> {
        let path = self.sup(name);
        let mut a: Vec<&str> = args.to_vec();
        for x in a.iter_mut() {
            if *x == "@" {
                *x = &path;
            }
        }
        qemu_img(&a);
        rd(Path::new(&path))
    }
    /// qemu-img create straight into the corpus.
    fn qemu_out(&self, name: &str, args: &[&str]) {
        let path = self.out(name);
        let ps = path.to_str().unwrap();
        let a: Vec<&str> = args
            .iter()
            .map(|x| if *x == "@" { ps } else { x })
            .collect();
        qemu_img(&a);
    }
}

/// A minimal valid qcow2 v3 image (no extensions): header, refcount table, refcount block,
/// L1 table, each one cluster.
pub fn mini_qcow2(size: u64, cluster_bits: u32) -> Vec<u8> {
    let cs = 1usize << cluster_bits;
    let l2_cover = (cs as u64 / 8) * cs as u64;
    let l1_size = size.div_ceil(l2_cover);
    let l1_clusters = ((l1_size * 8) as usize).div_ceil(cs).max(1);
    let mut b = vec![0u8; cs * (3 + l1_clusters)];
    put(&mut b, 0, b"QFI\xfb");
    put(&mut b, 4, &3u32.to_be_bytes());
    put(&mut b, 20, &cluster_bits.to_be_bytes());
    put(&mut b, 24, &size.to_be_bytes());
    put(&mut b, 36, &(l1_size as u32).to_be_bytes());
    put(&mut b, 40, &(3 * cs as u64).to_be_bytes());
    put(&mut b, 48, &(cs as u64).to_be_bytes());
    put(&mut b, 56, &1u32.to_be_bytes());
    put(&mut b, 96, &4u32.to_be_bytes());
    put(&mut b, 100, &104u32.to_be_bytes());
    // refcount table -> block at cluster 2; refcounts of clusters 0..3+l1 = 1
    put(&mut b, cs, &(2 * cs as u64).to_be_bytes());
    for i in 0..(3 + l1_clusters) {
        put(&mut b, 2 * cs + i * 2, &1u16.to_be_bytes());
    }
    b
}

/// A minimal ISO 9660 image of `size` bytes (primary volume descriptor + terminator).
pub fn mini_iso(size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    let blocks = (size / 2048) as u32;
    b[0x8000] = 1;
    put(&mut b, 0x8001, b"CD001\x01");
    put(&mut b, 0x8000 + 40, b"HOSTILE                         ");
    put(&mut b, 0x8000 + 80, &blocks.to_le_bytes());
    put(&mut b, 0x8000 + 84, &blocks.to_be_bytes());
    put(&mut b, 0x8000 + 128, &2048u16.to_le_bytes());
    put(&mut b, 0x8000 + 130, &2048u16.to_be_bytes());
    b[0x8800] = 255;
    put(&mut b, 0x8801, b"CD001\x01");
    b
}

/// Writes the corpus into `dir` (created if needed) and `dir/expected.json`; returns the cases.
pub fn write_corpus(dir: &Path) -> Vec<HostileCase> {
    std::fs::create_dir_all(dir.join("support")).unwrap();
    let mut g = Gen {
        dir: dir.to_path_buf(),
        sup: dir.join("support"),
        cases: Vec::new(),
    };
    make_source_raw(&g.sup.join("src.raw"), 40 * MIB);
    std::fs::write(g.sup.join("base.raw"), vec![0x5a; 65536]).unwrap();
    qcow2_cases(&mut g);
    vmdk_cases(&mut g);
    vhd_cases(&mut g);
    vhdx_cases(&mut g);
    other_cases(&mut g);
    confusion_cases(&mut g);
    let mut f = std::fs::File::create(dir.join("expected.json")).unwrap();
    f.write_all(serde_json::to_string_pretty(&g.cases).unwrap().as_bytes())
        .unwrap();
    g.cases
}

fn qcow2_cases(g: &mut Gen) {
    let src = g.sup("src.raw");
    let base = g.sup("base.raw");
    g.qemu_out(
        "qcow2-backing-raw.qcow2",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", "@", "16M",
        ],
    );
    g.add(
        "qcow2-backing-raw.qcow2",
        &["qcow2.backing_file"],
        None,
        "qcow2 with a raw backing file (qemu-img -b)",
    );
    g.qemu("base.qcow2", &["create", "-q", "-f", "qcow2", "@", "16M"]);
    let bq = g.sup("base.qcow2");
    g.qemu_out(
        "qcow2-backing-qcow2.qcow2",
        &["create", "-q", "-f", "qcow2", "-b", &bq, "-F", "qcow2", "@"],
    );
    g.add(
        "qcow2-backing-qcow2.qcow2",
        &["qcow2.backing_file"],
        Some("qcow2"),
        "qcow2 with a qcow2 backing file",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 200, b"/etc/shadow");
    put(&mut b, 8, &200u64.to_be_bytes());
    put(&mut b, 16, &11u32.to_be_bytes());
    g.write("qcow2-backing-etc-shadow.qcow2", &b);
    g.add(
        "qcow2-backing-etc-shadow.qcow2",
        &["qcow2.backing_file"],
        None,
        "hand-built qcow2 naming /etc/shadow as backing file",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 16, &1u32.to_be_bytes());
    g.write("qcow2-backing-size-only.qcow2", &b);
    g.add(
        "qcow2-backing-size-only.qcow2",
        &["qcow2.backing_file"],
        None,
        "backing_file_size nonzero with offset 0",
    );

    let data = g.sup("data.raw");
    g.qemu_out(
        "qcow2-data-file.qcow2",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={data}"),
            "@",
            "16M",
        ],
    );
    g.add(
        "qcow2-data-file.qcow2",
        &["qcow2.data_file"],
        None,
        "qcow2 with an external data file (CVE-2024-32498)",
    );
    let data2 = g.sup("data2.raw");
    g.qemu_out(
        "qcow2-data-file-raw.qcow2",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={data2},data_file_raw=on"),
            "@",
            "16M",
        ],
    );
    g.add(
        "qcow2-data-file-raw.qcow2",
        &["qcow2.data_file"],
        None,
        "qcow2 with data_file_raw=on",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 72, &4u64.to_be_bytes());
    g.write("qcow2-data-file-bit.qcow2", &b);
    g.add(
        "qcow2-data-file-bit.qcow2",
        &["qcow2.data_file"],
        None,
        "incompatible bit 2 (external data file) without the name extension",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 104, &0x4441_5441u32.to_be_bytes());
    put(&mut b, 108, &10u32.to_be_bytes());
    put(&mut b, 112, b"/dev/sda\0\0");
    g.write("qcow2-data-file-ext-only.qcow2", &b);
    g.add(
        "qcow2-data-file-ext-only.qcow2",
        &["qcow2.data_file"],
        None,
        "external data file extension naming /dev/sda",
    );

    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 72, &(1u64 << 5).to_be_bytes());
    g.write("qcow2-unknown-incompat-bit5.qcow2", &b);
    g.add(
        "qcow2-unknown-incompat-bit5.qcow2",
        &["qcow2.unknown_incompatible_features"],
        None,
        "unknown incompatible feature bit 5",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 72, &(1u64 << 63).to_be_bytes());
    g.write("qcow2-unknown-incompat-bit63.qcow2", &b);
    g.add(
        "qcow2-unknown-incompat-bit63.qcow2",
        &["qcow2.unknown_incompatible_features"],
        None,
        "unknown incompatible feature bit 63",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 72, &2u64.to_be_bytes());
    g.write("qcow2-corrupt-bit.qcow2", &b);
    g.add(
        "qcow2-corrupt-bit.qcow2",
        &["qcow2.corrupt"],
        None,
        "image marked corrupt",
    );

    g.qemu_out(
        "qcow2-luks-encrypted.qcow2",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=hostile",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "@",
            "16M",
        ],
    );
    g.add(
        "qcow2-luks-encrypted.qcow2",
        &["qcow2.encrypted"],
        None,
        "qcow2 with LUKS encryption",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 32, &1u32.to_be_bytes());
    g.write("qcow2-aes-encrypted.qcow2", &b);
    g.add(
        "qcow2-aes-encrypted.qcow2",
        &["qcow2.encrypted"],
        None,
        "crypt_method 1 (legacy AES)",
    );

    for (name, bits) in [
        ("qcow2-cluster-bits-8.qcow2", 8u32),
        ("qcow2-cluster-bits-31.qcow2", 31),
    ] {
        let mut b = mini_qcow2(16 * MIB, 16);
        put(&mut b, 20, &bits.to_be_bytes());
        g.write(name, &b);
        g.add(
            name,
            &["qcow2.bad_cluster_bits"],
            None,
            "cluster_bits out of range",
        );
    }
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 40, &(1u64 << 40).to_be_bytes());
    g.write("qcow2-l1-outside.qcow2", &b);
    g.add(
        "qcow2-l1-outside.qcow2",
        &["qcow2.table_out_of_bounds"],
        None,
        "L1 table offset past the end of the file",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 40, &(3 * 65536u64 + 8).to_be_bytes());
    g.write("qcow2-l1-unaligned.qcow2", &b);
    g.add(
        "qcow2-l1-unaligned.qcow2",
        &["qcow2.table_unaligned"],
        None,
        "L1 table offset not cluster aligned",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 48, &(1u64 << 50).to_be_bytes());
    g.write("qcow2-refcount-outside.qcow2", &b);
    g.add(
        "qcow2-refcount-outside.qcow2",
        &["qcow2.table_out_of_bounds"],
        None,
        "refcount table past the end of the file",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 36, &0x1000_0000u32.to_be_bytes());
    g.write("qcow2-l1-huge.qcow2", &b);
    g.add(
        "qcow2-l1-huge.qcow2",
        &["qcow2.table_too_large"],
        None,
        "l1_size of 256M entries",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 36, &0u32.to_be_bytes());
    g.write("qcow2-l1-too-small.qcow2", &b);
    g.add(
        "qcow2-l1-too-small.qcow2",
        &["qcow2.l1_too_small"],
        None,
        "l1_size 0 for a 16 MiB disk",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 100, &50u32.to_be_bytes());
    g.write("qcow2-header-length-50.qcow2", &b);
    g.add(
        "qcow2-header-length-50.qcow2",
        &["qcow2.bad_header_length"],
        None,
        "v3 header_length shorter than 104",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 104, &0x1234_5678u32.to_be_bytes());
    put(&mut b, 108, &0xffff_0000u32.to_be_bytes());
    g.write("qcow2-extension-overflow.qcow2", &b);
    g.add(
        "qcow2-extension-overflow.qcow2",
        &["qcow2.bad_header_extension"],
        None,
        "header extension length past the header cluster",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 4, &4u32.to_be_bytes());
    g.write("qcow2-version-4.qcow2", &b);
    g.add(
        "qcow2-version-4.qcow2",
        &["qcow2.unsupported_version"],
        None,
        "qcow2 version 4",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 72, &8u64.to_be_bytes());
    put(&mut b, 100, &112u32.to_be_bytes());
    b[104] = 7;
    g.write("qcow2-compression-type-7.qcow2", &b);
    g.add(
        "qcow2-compression-type-7.qcow2",
        &["qcow2.unknown_compression_type"],
        None,
        "unknown compression type 7",
    );

    let mut b = mini_qcow2(1 << 50, 16);
    b.truncate(3 * 65536);
    g.write("qcow2-virtual-size-1p.qcow2", &b);
    g.add(
        "qcow2-virtual-size-1p.qcow2",
        &["image.virtual_size_too_large"],
        None,
        "virtual size of 1 PiB",
    );
    g.qemu_out(
        "qcow2-virtual-size-0.qcow2",
        &["create", "-q", "-f", "qcow2", "@", "0"],
    );
    g.add(
        "qcow2-virtual-size-0.qcow2",
        &["image.virtual_size_zero"],
        None,
        "virtual size 0",
    );
    let b = mini_qcow2(16 * MIB, 16);
    g.write("qcow2-truncated-header.qcow2", &b[..60]);
    g.add(
        "qcow2-truncated-header.qcow2",
        &["image.truncated"],
        None,
        "file ends inside the header",
    );

    // Snapshots.
    let p = g.out("qcow2-snapshot.qcow2");
    g.qemu_out(
        "qcow2-snapshot.qcow2",
        &["convert", "-q", "-O", "qcow2", "-f", "raw", &src, "@"],
    );
    qemu_img(&["snapshot", "-q", "-c", "snap1", p.to_str().unwrap()]);
    g.add(
        "qcow2-snapshot.qcow2",
        &["qcow2.snapshots"],
        None,
        "internal snapshot (hidden content)",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(&mut b, 60, &1u32.to_be_bytes());
    put(&mut b, 64, &(1u64 << 44).to_be_bytes());
    g.write("qcow2-snapshot-table-outside.qcow2", &b);
    g.add(
        "qcow2-snapshot-table-outside.qcow2",
        &["qcow2.snapshots", "qcow2.table_out_of_bounds"],
        None,
        "snapshot table past the end",
    );

    // Deep: tables.
    let conv = g.qemu(
        "conv.qcow2",
        &["convert", "-q", "-O", "qcow2", "-f", "raw", &src, "@"],
    );
    let l1 = be64(&conv, 40) as usize;
    let l2 = (be64(&conv, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let mut b = conv.clone();
    put(&mut b, l1, &((1u64 << 63) | (1 << 45)).to_be_bytes());
    g.write("qcow2-l1-entry-outside.qcow2", &b);
    g.add(
        "qcow2-l1-entry-outside.qcow2",
        &["qcow2.l1_entry_out_of_bounds"],
        None,
        "L1 entry points past the end",
    );
    let mut b = conv.clone();
    put(&mut b, l2, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    g.write("qcow2-l2-entry-outside.qcow2", &b);
    g.add(
        "qcow2-l2-entry-outside.qcow2",
        &["qcow2.l2_entry_out_of_bounds"],
        None,
        "L2 entry points past the end",
    );
    let mut b = conv.clone();
    put(
        &mut b,
        l2 + 8,
        &((1u64 << 63) | (l2 as u64 + 512)).to_be_bytes(),
    );
    g.write("qcow2-l2-entry-unaligned.qcow2", &b);
    g.add(
        "qcow2-l2-entry-unaligned.qcow2",
        &["qcow2.l2_entry_out_of_bounds"],
        None,
        "L2 entry not cluster aligned",
    );
    let mut b = mini_qcow2(2048 * MIB, 16);
    let l2off = b.len() as u64;
    b.resize(b.len() + 65536, 0);
    put(&mut b, 3 * 65536, &((1u64 << 63) | l2off).to_be_bytes());
    put(&mut b, 3 * 65536 + 8, &((1u64 << 63) | l2off).to_be_bytes());
    g.write("qcow2-l2-shared.qcow2", &b);
    g.add(
        "qcow2-l2-shared.qcow2",
        &["qcow2.l2_table_shared"],
        None,
        "two L1 entries share one L2 table",
    );
    let half = conv.len() / 2;
    g.write("qcow2-truncated-half.qcow2", &conv[..half]);
    g.add(
        "qcow2-truncated-half.qcow2",
        &["qcow2.l2_entry_out_of_bounds"],
        None,
        "image cut in half: data clusters past the end",
    );

    let comp = g.qemu(
        "comp.qcow2",
        &["convert", "-q", "-c", "-O", "qcow2", "-f", "raw", &src, "@"],
    );
    let l1 = be64(&comp, 40) as usize;
    let l2 = (be64(&comp, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be64(&comp, l2);
    assert!(
        e & (1 << 62) != 0,
        "first cluster of comp.qcow2 is compressed"
    );
    let mut b = comp.clone();
    put(
        &mut b,
        l2,
        &((e & !((1u64 << 54) - 1)) | (1u64 << 50)).to_be_bytes(),
    );
    g.write("qcow2-compressed-outside.qcow2", &b);
    g.add(
        "qcow2-compressed-outside.qcow2",
        &["qcow2.compressed_cluster_out_of_bounds"],
        None,
        "compressed cluster descriptor past the end",
    );

    // Compression bombs: every L2 entry points at one tiny compressed blob.
    for zstd in [false, true] {
        let cs = 65536u64;
        let tables = 4u64;
        let size = tables * 8192 * cs;
        let mut b = mini_qcow2(size, 16);
        if zstd {
            put(&mut b, 72, &8u64.to_be_bytes());
            put(&mut b, 100, &112u32.to_be_bytes());
            b[104] = 1;
        }
        let first_l2 = b.len() as u64;
        b.resize(b.len() + (tables as usize) * 65536, 0);
        let blob_off = b.len() as u64;
        let zeros = vec![0u8; cs as usize];
        let blob = if zstd {
            ruzstd::encoding::compress_to_vec(
                &zeros[..],
                ruzstd::encoding::CompressionLevel::Fastest,
            )
        } else {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(&zeros).unwrap();
            e.finish().unwrap()
        };
        b.extend_from_slice(&blob);
        b.resize(b.len().next_multiple_of(512), 0);
        let entry = (1u64 << 62) | blob_off;
        for t in 0..tables {
            let l2 = first_l2 + t * cs;
            put(
                &mut b,
                3 * 65536 + t as usize * 8,
                &((1u64 << 63) | l2).to_be_bytes(),
            );
            for j in 0..8192usize {
                put(&mut b, l2 as usize + j * 8, &entry.to_be_bytes());
            }
        }
        let name = if zstd {
            "qcow2-bomb-zstd.qcow2"
        } else {
            "qcow2-bomb-zlib.qcow2"
        };
        g.write(name, &b);
        g.add(
            name,
            &["qcow2.compression_bomb"],
            None,
            "2 GiB of compressed clusters all pointing at one small blob",
        );
    }

    g.qemu_out("qcow-v1.qcow", &["create", "-q", "-f", "qcow", "@", "16M"]);
    g.add(
        "qcow-v1.qcow",
        &["qcow.legacy_format"],
        None,
        "legacy qcow version 1",
    );
}

fn vmdk_cases(g: &mut Gen) {
    let src = g.sup("src.raw");
    for (sub, file) in [
        ("monolithicFlat", "vmdk-monolithic-flat.vmdk"),
        ("twoGbMaxExtentFlat", "vmdk-twogb-flat.vmdk"),
        ("twoGbMaxExtentSparse", "vmdk-twogb-sparse.vmdk"),
    ] {
        g.qemu(
            file,
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                "@",
                "16M",
            ],
        );
        std::fs::copy(g.sup(file), g.out(file)).unwrap();
        g.add(
            file,
            &["vmdk.descriptor_only"],
            None,
            &format!("{sub} descriptor: data in other files"),
        );
    }
    let desc = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 2048 FLAT \"/etc/passwd\" 0\n\nddb.virtualHWVersion = \"4\"\n";
    g.write("vmdk-descriptor-etc-passwd.vmdk", desc.as_bytes());
    g.add(
        "vmdk-descriptor-etc-passwd.vmdk",
        &[
            "vmdk.descriptor_only",
            "vmdk.extent_path",
            "vmdk.external_extent",
        ],
        None,
        "descriptor whose flat extent is /etc/passwd (CVE-2022-47951)",
    );
    let mut raw = desc.replace("/etc/passwd", "disk-flat.img").into_bytes();
    raw.resize(1 << 20, 0);
    g.write("raw-with-vmdk-descriptor.img", &raw);
    g.add(
        "raw-with-vmdk-descriptor.img",
        &["vmdk.descriptor_only", "image.declared_format_mismatch"],
        Some("raw"),
        "declared raw, content is a vmdk descriptor",
    );

    let sparse = g.qemu(
        "sparse.vmdk",
        &["convert", "-q", "-O", "vmdk", "-f", "raw", &src, "@"],
    );
    let doff = le64(&sparse, 28) as usize * 512;
    let dlen = le64(&sparse, 36) as usize * 512;
    let with_desc = |text: &str| {
        let mut b = sparse.clone();
        let mut d = text.as_bytes().to_vec();
        d.resize(dlen, 0);
        put(&mut b, doff, &d);
        b
    };
    let cap = le64(&sparse, 12);
    let head = "# Disk DescriptorFile\nversion=1\nCID=abcdef01\nparentCID=ffffffff\n";
    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        ("vmdk-sparse-flat-extent.vmdk", format!("{head}createType=\"monolithicSparse\"\nRW {cap} FLAT \"/etc/passwd\" 0\n"), vec!["vmdk.external_extent", "vmdk.extent_path"], "sparse file whose descriptor names a flat host file"),
        ("vmdk-sparse-vmfs-extent.vmdk", format!("{head}createType=\"monolithicSparse\"\nRW {cap} VMFS \"disk.vmdk\"\n"), vec!["vmdk.external_extent"], "VMFS extent"),
        ("vmdk-sparse-relative-path.vmdk", format!("{head}createType=\"monolithicSparse\"\nRW {cap} SPARSE \"../../images/other.vmdk\"\n"), vec!["vmdk.extent_path"], "extent with a relative path"),
        ("vmdk-sparse-two-extents.vmdk", format!("{head}createType=\"monolithicSparse\"\nRW {cap} SPARSE \"a.vmdk\"\nRW {cap} SPARSE \"b.vmdk\"\n"), vec!["vmdk.extent_count"], "two extents"),
        ("vmdk-sparse-no-extents.vmdk", format!("{head}createType=\"monolithicSparse\"\n"), vec!["vmdk.extent_count"], "no extents"),
        ("vmdk-sparse-createtype-vmfs.vmdk", format!("{head}createType=\"vmfs\"\nRW {cap} SPARSE \"x.vmdk\"\n"), vec!["vmdk.unsupported_create_type"], "createType vmfs"),
        ("vmdk-sparse-parent.vmdk", format!("# Disk DescriptorFile\nversion=1\nCID=abcdef01\nparentCID=12345678\nparentFileNameHint=\"base.vmdk\"\ncreateType=\"monolithicSparse\"\nRW {cap} SPARSE \"x.vmdk\"\n"), vec!["vmdk.parent"], "delta disk with a parent"),
        ("vmdk-sparse-garbage-line.vmdk", format!("{head}createType=\"monolithicSparse\"\nRW {cap} SPARSE \"x.vmdk\"\nthis is not a descriptor line\n"), vec!["vmdk.invalid_descriptor"], "unparseable descriptor line"),
    ];
    for (name, text, exp, what) in cases {
        g.write(name, &with_desc(&text));
        g.add(name, &exp, None, what);
    }
    let mut b = sparse.clone();
    put(&mut b, 28, &(1u64 << 40).to_le_bytes());
    g.write("vmdk-descriptor-outside.vmdk", &b);
    g.add(
        "vmdk-descriptor-outside.vmdk",
        &["vmdk.descriptor_out_of_bounds"],
        None,
        "embedded descriptor offset past the end",
    );
    let mut b = sparse.clone();
    put(&mut b, 28, &0u64.to_le_bytes());
    put(&mut b, 36, &0u64.to_le_bytes());
    g.write("vmdk-no-descriptor.vmdk", &b);
    g.add(
        "vmdk-no-descriptor.vmdk",
        &["vmdk.missing_descriptor"],
        None,
        "sparse extent without descriptor",
    );
    let mut b = sparse.clone();
    put(&mut b, 20, &3u64.to_le_bytes());
    g.write("vmdk-grain-size-3.vmdk", &b);
    g.add(
        "vmdk-grain-size-3.vmdk",
        &["vmdk.bad_grain_size"],
        None,
        "grain size of 3 sectors",
    );
    let mut b = sparse.clone();
    put(&mut b, 20, &(1u64 << 30).to_le_bytes());
    g.write("vmdk-grain-size-huge.vmdk", &b);
    g.add(
        "vmdk-grain-size-huge.vmdk",
        &["vmdk.bad_grain_size"],
        None,
        "grain size of 512 GiB",
    );
    let mut b = sparse.clone();
    put(&mut b, 56, &(1u64 << 40).to_le_bytes());
    g.write("vmdk-gd-outside.vmdk", &b);
    g.add(
        "vmdk-gd-outside.vmdk",
        &["vmdk.grain_directory_out_of_bounds"],
        None,
        "grain directory past the end",
    );
    let gd = le64(&sparse, 56) as usize * 512;
    let gt = le32(&sparse, gd) as usize * 512;
    let mut b = sparse.clone();
    put(&mut b, gd, &0x7fff_ffffu32.to_le_bytes());
    g.write("vmdk-gt-outside.vmdk", &b);
    g.add(
        "vmdk-gt-outside.vmdk",
        &["vmdk.grain_table_out_of_bounds"],
        None,
        "grain table past the end",
    );
    let mut b = sparse.clone();
    put(&mut b, gt, &0x7fff_ffffu32.to_le_bytes());
    g.write("vmdk-grain-outside.vmdk", &b);
    g.add(
        "vmdk-grain-outside.vmdk",
        &["vmdk.grain_out_of_bounds"],
        None,
        "grain past the end",
    );
    let mut b = sparse.clone();
    put(&mut b, 4, &9u32.to_le_bytes());
    g.write("vmdk-version-9.vmdk", &b);
    g.add(
        "vmdk-version-9.vmdk",
        &["vmdk.unsupported_version"],
        None,
        "sparse extent version 9",
    );
    let mut b = vec![0u8; 65536];
    put(&mut b, 0, b"COWD");
    put(&mut b, 4, &1u32.to_le_bytes());
    g.write("vmdk-cowd.vmdk", &b);
    g.add(
        "vmdk-cowd.vmdk",
        &["vmdk.unsupported_version"],
        None,
        "VMDK3 / ESX COWD sparse",
    );

    let stream = g.qemu(
        "stream.vmdk",
        &[
            "convert",
            "-q",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "-f",
            "raw",
            &src,
            "@",
        ],
    );
    let stream = vmdk_stream_with_footer(&stream);
    let n = stream.len();
    let mut b = stream.clone();
    b[n - 100] = 0x41;
    g.write("vmdk-stream-bad-eos.vmdk", &b);
    g.add(
        "vmdk-stream-bad-eos.vmdk",
        &["vmdk.bad_footer"],
        None,
        "streamOptimized with a corrupt end-of-stream marker",
    );
    let mut b = stream.clone();
    put(&mut b, n - 1024 + 56, &u64::MAX.to_le_bytes());
    g.write("vmdk-stream-footer-loop.vmdk", &b);
    g.add(
        "vmdk-stream-footer-loop.vmdk",
        &["vmdk.bad_footer"],
        None,
        "streamOptimized footer pointing at another footer",
    );
    let mut b = stream.clone();
    put(&mut b, n - 1024 + 28, &7u64.to_le_bytes());
    g.write("vmdk-stream-footer-descriptor.vmdk", &b);
    g.add(
        "vmdk-stream-footer-descriptor.vmdk",
        &["vmdk.bad_footer"],
        None,
        "footer names a different descriptor than the header",
    );
}

fn vhd_cases(g: &mut Gen) {
    let src = g.sup("src.raw");
    let fixed = g.qemu(
        "fixed.vhd",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            "@",
            "16M",
        ],
    );
    let n = fixed.len();
    let mut b = fixed.clone();
    b[n - 512 + 100] ^= 0xff;
    g.write("vhd-fixed-bad-checksum.vhd", &b);
    g.add(
        "vhd-fixed-bad-checksum.vhd",
        &["vhd.bad_footer_checksum"],
        None,
        "fixed VHD with a corrupt footer checksum",
    );
    let mut b = fixed.clone();
    put(&mut b, n - 512 + 48, &(64 * MIB).to_be_bytes());
    put(&mut b, n - 512 + 40, &(64 * MIB).to_be_bytes());
    put(&mut b, n - 512 + 28, b"win ");
    vhd_fix(&mut b, n - 512, 512, 64);
    g.write("vhd-fixed-size-lie.vhd", &b);
    g.add(
        "vhd-fixed-size-lie.vhd",
        &["vhd.size_mismatch"],
        None,
        "fixed VHD declaring 64 MiB over 16 MiB of data",
    );
    let mut b = fixed.clone();
    put(&mut b, n - 512 + 60, &7u32.to_be_bytes());
    vhd_fix(&mut b, n - 512, 512, 64);
    g.write("vhd-disk-type-7.vhd", &b);
    g.add(
        "vhd-disk-type-7.vhd",
        &["vhd.unsupported_disk_type"],
        None,
        "disk type 7",
    );

    let dynv = g.qemu(
        "dyn.vhd",
        &["convert", "-q", "-O", "vpc", "-f", "raw", &src, "@"],
    );
    let n = dynv.len();
    let fix_both = |b: &mut Vec<u8>, off: usize, v: &[u8]| {
        put(b, off, v);
        put(b, n - 512 + off, v);
        vhd_fix(b, 0, 512, 64);
        vhd_fix(b, n - 512, 512, 64);
    };
    let mut b = dynv.clone();
    fix_both(&mut b, 60, &4u32.to_be_bytes());
    g.write("vhd-differencing.vhd", &b);
    g.add(
        "vhd-differencing.vhd",
        &["vhd.differencing"],
        None,
        "differencing VHD (parent = backing file)",
    );
    let dh = be64(&dynv, 16) as usize;
    let mut b = dynv.clone();
    put(&mut b, dh + 576, b"W2ku");
    put(&mut b, dh + 576 + 4, &1u32.to_be_bytes());
    put(&mut b, dh + 576 + 8, &22u32.to_be_bytes());
    vhd_fix(&mut b, dh, 1024, 36);
    g.write("vhd-parent-locator.vhd", &b);
    g.add(
        "vhd-parent-locator.vhd",
        &["vhd.differencing"],
        None,
        "dynamic VHD with a parent locator",
    );
    let mut b = dynv.clone();
    b[dh + 100] ^= 0xff;
    g.write("vhd-dyn-bad-checksum.vhd", &b);
    g.add(
        "vhd-dyn-bad-checksum.vhd",
        &["vhd.bad_dynamic_header_checksum"],
        None,
        "dynamic header checksum mismatch",
    );
    let mut b = dynv.clone();
    put(&mut b, dh + 16, &(1u64 << 40).to_be_bytes());
    vhd_fix(&mut b, dh, 1024, 36);
    g.write("vhd-bat-outside.vhd", &b);
    g.add(
        "vhd-bat-outside.vhd",
        &["vhd.bat_out_of_bounds"],
        None,
        "BAT past the end",
    );
    let mut b = dynv.clone();
    put(&mut b, dh + 28, &1u32.to_be_bytes());
    vhd_fix(&mut b, dh, 1024, 36);
    g.write("vhd-bat-too-small.vhd", &b);
    g.add(
        "vhd-bat-too-small.vhd",
        &["vhd.bat_out_of_bounds"],
        None,
        "BAT with 1 entry for a 40 MiB disk",
    );
    let mut b = dynv.clone();
    put(&mut b, dh + 32, &3000u32.to_be_bytes());
    vhd_fix(&mut b, dh, 1024, 36);
    g.write("vhd-block-size-3000.vhd", &b);
    g.add(
        "vhd-block-size-3000.vhd",
        &["vhd.bad_block_size"],
        None,
        "block size 3000",
    );
    let bat = be64(&dynv, dh + 16) as usize;
    let mut b = dynv.clone();
    put(&mut b, bat, &0x7fff_0000u32.to_be_bytes());
    g.write("vhd-block-outside.vhd", &b);
    g.add(
        "vhd-block-outside.vhd",
        &["vhd.block_out_of_bounds"],
        None,
        "BAT entry past the end",
    );
    let mut b = dynv.clone();
    put(&mut b, 24, &12345u32.to_be_bytes());
    vhd_fix(&mut b, 0, 512, 64);
    g.write("vhd-footer-mismatch.vhd", &b);
    g.add(
        "vhd-footer-mismatch.vhd",
        &["vhd.footer_mismatch"],
        None,
        "footer copy at the start differs from the end",
    );
    let mut b = dynv.clone();
    put(&mut b, 16, &(1u64 << 40).to_be_bytes());
    put(&mut b, n - 512 + 16, &(1u64 << 40).to_be_bytes());
    vhd_fix(&mut b, 0, 512, 64);
    vhd_fix(&mut b, n - 512, 512, 64);
    g.write("vhd-dyn-header-outside.vhd", &b);
    g.add(
        "vhd-dyn-header-outside.vhd",
        &["vhd.dynamic_header_out_of_bounds"],
        None,
        "dynamic header offset past the end",
    );
}

fn vhdx_regions(b: &[u8]) -> Vec<(usize, [u8; 16], u64)> {
    let mut v = Vec::new();
    for t in [192usize << 10, 256 << 10] {
        let count = le32(b, t + 8) as usize;
        for i in 0..count {
            let e = t + 16 + i * 32;
            v.push((e, b[e..e + 16].try_into().unwrap(), le64(b, e + 16)));
        }
    }
    v
}

fn vhdx_cases(g: &mut Gen) {
    let src = g.sup("src.raw");
    let base = g.qemu(
        "conv.vhdx",
        &["convert", "-q", "-O", "vhdx", "-f", "raw", &src, "@"],
    );
    let bat_guid = guid_bytes("2DC27766-F623-4200-9D64-115E9BFD4A08");
    let meta_guid = guid_bytes("8B7CA206-4790-4B9A-B8FE-575F050F886E");
    let fp_guid = guid_bytes("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
    let regions = vhdx_regions(&base);
    let meta = regions.iter().find(|r| r.1 == meta_guid).unwrap().2 as usize;
    let bat = regions.iter().find(|r| r.1 == bat_guid).unwrap().2 as usize;
    let mcount = u16::from_le_bytes([base[meta + 10], base[meta + 11]]) as usize;
    let fp_item = (0..mcount)
        .map(|i| meta + 32 + i * 32)
        .find(|&e| base[e..e + 16] == fp_guid)
        .map(|e| meta + le32(&base, e + 16) as usize)
        .unwrap();

    let mut b = base.clone();
    b[(64 << 10) + 200] ^= 1;
    b[(128 << 10) + 200] ^= 1;
    g.write("vhdx-bad-header-crc.vhdx", &b);
    g.add(
        "vhdx-bad-header-crc.vhdx",
        &["vhdx.bad_header_checksum"],
        None,
        "both VHDX headers fail CRC-32C",
    );
    let mut b = base.clone();
    b[(192 << 10) + 2000] ^= 1;
    b[(256 << 10) + 2000] ^= 1;
    g.write("vhdx-bad-region-crc.vhdx", &b);
    g.add(
        "vhdx-bad-region-crc.vhdx",
        &["vhdx.bad_region_table_checksum"],
        None,
        "both region tables fail CRC-32C",
    );
    let mut b = base.clone();
    let flags = le32(&b, fp_item + 4) | 2;
    put(&mut b, fp_item + 4, &flags.to_le_bytes());
    g.write("vhdx-has-parent.vhdx", &b);
    g.add(
        "vhdx-has-parent.vhdx",
        &["vhdx.differencing"],
        None,
        "file parameters has_parent flag",
    );
    let mut b = base.clone();
    put(&mut b, fp_item, &12345u32.to_le_bytes());
    g.write("vhdx-block-size-12345.vhdx", &b);
    g.add(
        "vhdx-block-size-12345.vhdx",
        &["vhdx.bad_metadata"],
        None,
        "payload block size 12345",
    );
    let mut b = base.clone();
    for (e, guid, _) in &regions {
        if *guid == bat_guid {
            put(&mut b, e + 16, &(1u64 << 40).to_le_bytes());
        }
    }
    crc32c_fix(&mut b, 192 << 10, 64 << 10);
    crc32c_fix(&mut b, 256 << 10, 64 << 10);
    g.write("vhdx-bat-region-outside.vhdx", &b);
    g.add(
        "vhdx-bat-region-outside.vhdx",
        &["vhdx.region_out_of_bounds"],
        None,
        "BAT region past the end",
    );
    let mut b = base.clone();
    for t in [192usize << 10, 256 << 10] {
        let count = le32(&b, t + 8) as usize;
        let e = t + 16 + count * 32;
        put(
            &mut b,
            e,
            &guid_bytes("DEADBEEF-0000-4000-8000-00000000CAFE"),
        );
        put(&mut b, e + 16, &(1u64 << 20).to_le_bytes());
        put(&mut b, e + 24, &(1u32 << 20).to_le_bytes());
        put(&mut b, e + 28, &1u32.to_le_bytes());
        put(&mut b, t + 8, &(count as u32 + 1).to_le_bytes());
        crc32c_fix(&mut b, t, 64 << 10);
    }
    g.write("vhdx-unknown-required-region.vhdx", &b);
    g.add(
        "vhdx-unknown-required-region.vhdx",
        &["vhdx.unknown_required_region"],
        None,
        "unknown region marked required",
    );
    let mut b = base.clone();
    for h in [64usize << 10, 128 << 10] {
        put(&mut b, h + 48, &[0x11; 16]);
        crc32c_fix(&mut b, h, 4096);
    }
    g.write("vhdx-log-not-empty.vhdx", &b);
    g.add(
        "vhdx-log-not-empty.vhdx",
        &["vhdx.log_not_empty"],
        None,
        "log GUID set: qemu would replay (write) the log",
    );
    let first = (0..64)
        .map(|i| bat + i * 8)
        .find(|&o| le64(&base, o) & 7 == 6)
        .unwrap();
    let mut b = base.clone();
    put(&mut b, first, &((1u64 << 45) | 6).to_le_bytes());
    g.write("vhdx-block-outside.vhdx", &b);
    g.add(
        "vhdx-block-outside.vhdx",
        &["vhdx.block_out_of_bounds"],
        None,
        "BAT entry past the end",
    );
    let mut b = base.clone();
    let md = meta + 32 + mcount * 32;
    put(
        &mut b,
        md,
        &guid_bytes("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"),
    );
    put(
        &mut b,
        md + 16,
        &(le32(&base, meta + 32 + 16)).to_le_bytes(),
    );
    put(&mut b, md + 20, &8u32.to_le_bytes());
    put(&mut b, md + 24, &6u32.to_le_bytes());
    put(&mut b, meta + 10, &(mcount as u16 + 1).to_le_bytes());
    g.write("vhdx-parent-locator.vhdx", &b);
    g.add(
        "vhdx-parent-locator.vhdx",
        &["vhdx.differencing"],
        None,
        "parent locator metadata item",
    );
}

fn other_cases(g: &mut Gen) {
    let src = g.sup("src.raw");
    let base = g.sup("base.raw");
    g.qemu_out(
        "luks.img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=hostile",
            "-f",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10",
            "@",
            "16M",
        ],
    );
    g.add("luks.img", &["luks.encrypted"], None, "LUKS container");
    g.qemu_out(
        "qed-backing.qed",
        &[
            "create", "-q", "-f", "qed", "-b", &base, "-F", "raw", "@", "16M",
        ],
    );
    g.add(
        "qed-backing.qed",
        &["qed.backing_file"],
        None,
        "qed with a backing file",
    );
    let qed = g.qemu("plain.qed", &["create", "-q", "-f", "qed", "@", "16M"]);
    let mut b = qed.clone();
    put(&mut b, 16, &0x100u64.to_le_bytes());
    g.write("qed-unknown-features.qed", &b);
    g.add(
        "qed-unknown-features.qed",
        &["qed.unknown_features"],
        None,
        "qed unknown feature bit",
    );
    let mut b = qed.clone();
    put(&mut b, 40, &(1u64 << 40).to_le_bytes());
    g.write("qed-l1-outside.qed", &b);
    g.add(
        "qed-l1-outside.qed",
        &["qed.table_out_of_bounds"],
        None,
        "qed L1 table past the end",
    );
    let mut b = qed.clone();
    put(&mut b, 4, &1000u32.to_le_bytes());
    g.write("qed-cluster-size-1000.qed", &b);
    g.add(
        "qed-cluster-size-1000.qed",
        &["qed.bad_geometry"],
        None,
        "qed cluster size 1000",
    );

    let vdi = g.qemu(
        "plain.vdi",
        &["convert", "-q", "-O", "vdi", "-f", "raw", &src, "@"],
    );
    let mut b = vdi.clone();
    put(&mut b, 0x4c, &4u32.to_le_bytes());
    g.write("vdi-differencing.vdi", &b);
    g.add(
        "vdi-differencing.vdi",
        &["vdi.differencing"],
        None,
        "vdi differencing image",
    );
    let mut b = vdi.clone();
    put(&mut b, 0x154, &0x4000_0000u32.to_le_bytes());
    put(&mut b, 0x158, &0x4010_0000u32.to_le_bytes());
    g.write("vdi-bmap-outside.vdi", &b);
    g.add(
        "vdi-bmap-outside.vdi",
        &["vdi.block_map_out_of_bounds"],
        None,
        "vdi block map past the end",
    );
    let bmap = le32(&vdi, 0x154) as usize;
    let mut b = vdi.clone();
    put(&mut b, bmap, &39u32.to_le_bytes());
    g.write("vdi-block-outside.vdi", &b);
    g.add(
        "vdi-block-outside.vdi",
        &["vdi.block_out_of_bounds"],
        None,
        "vdi block map entry past the end",
    );
    let mut b = vdi.clone();
    put(&mut b, 0x178, &4096u32.to_le_bytes());
    g.write("vdi-block-size-4k.vdi", &b);
    g.add(
        "vdi-block-size-4k.vdi",
        &["vdi.bad_geometry"],
        None,
        "vdi block size 4 KiB",
    );
    let mut b = vdi.clone();
    put(&mut b, 0x44, &0x0002_0000u32.to_le_bytes());
    g.write("vdi-version-2.vdi", &b);
    g.add(
        "vdi-version-2.vdi",
        &["vdi.unsupported_version"],
        None,
        "vdi version 2.0",
    );

    let mut b = vec![0u8; 1 << 20];
    put(&mut b, 0, b"Bochs Virtual HD Image\0");
    g.write("bochs.img", &b);
    g.add(
        "bochs.img",
        &["image.foreign_format"],
        None,
        "bochs image (qemu would interpret it)",
    );
    let mut b = vec![0u8; 1 << 20];
    put(&mut b, 0, b"WithoutFreeSpace");
    g.write("parallels.img", &b);
    g.add(
        "parallels.img",
        &["image.foreign_format"],
        None,
        "parallels image",
    );
    let mut b = vec![0u8; 1 << 20];
    let n = b.len();
    put(&mut b, n - 512, b"koly\0\0\0\x04");
    g.write("dmg.img", &b);
    g.add("dmg.img", &["image.foreign_format"], None, "dmg trailer");
}

fn confusion_cases(g: &mut Gen) {
    let mut iso = mini_iso(1 << 20);
    let q = mini_qcow2(16 * MIB, 16);
    put(&mut iso, 0, &q[..4096]);
    g.write("iso-with-qcow2-header.iso", &iso);
    g.add(
        "iso-with-qcow2-header.iso",
        &["image.multiple_formats"],
        Some("iso"),
        "ISO whose system area holds a qcow2 header",
    );
    let mut iso = mini_iso(1 << 20);
    let sparse = rd(&g.sup.join("sparse.vmdk"));
    put(&mut iso, 0, &sparse[..512]);
    g.write("iso-with-vmdk-header.iso", &iso);
    g.add(
        "iso-with-vmdk-header.iso",
        &["image.multiple_formats"],
        None,
        "ISO whose system area holds a vmdk header",
    );
    let mut b = mini_qcow2(16 * MIB, 16);
    put(
        &mut b,
        446,
        &[
            0, 0, 2, 0, 0xee, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0xff, 0xff, 0, 0,
        ],
    );
    put(&mut b, 510, &[0x55, 0xaa]);
    put(&mut b, 512, b"EFI PART");
    g.write("qcow2-with-gpt.qcow2", &b);
    g.add(
        "qcow2-with-gpt.qcow2",
        &["image.multiple_formats"],
        None,
        "qcow2 header that is also a GPT disk",
    );
    // A fixed VHD whose data area starts with a qcow2 header.
    let qraw = g.sup("qcow2-in-raw.raw");
    let mut r = mini_qcow2(8 * MIB, 16);
    r.resize(16 << 20, 0);
    std::fs::write(&qraw, &r).unwrap();
    g.qemu_out(
        "vhd-fixed-holding-qcow2.vhd",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on",
            &qraw,
            "@",
        ],
    );
    g.add(
        "vhd-fixed-holding-qcow2.vhd",
        &["image.multiple_formats"],
        None,
        "fixed VHD whose data is a qcow2 image",
    );
    let clean = mini_qcow2(16 * MIB, 16);
    g.write("qcow2-declared-raw.img", &clean);
    g.add(
        "qcow2-declared-raw.img",
        &["image.declared_format_mismatch"],
        Some("raw"),
        "declared raw, content is qcow2",
    );
    let raw = vec![0u8; 1 << 20];
    g.write("raw-declared-qcow2.qcow2", &raw);
    g.add(
        "raw-declared-qcow2.qcow2",
        &["image.declared_format_mismatch"],
        Some("qcow2"),
        "declared qcow2, content is raw",
    );
    let f = std::fs::File::create(g.out("vhdx-declared-vhd.vhd")).unwrap();
    f.write_all_at(&rd(&g.sup.join("conv.vhdx")), 0).unwrap();
    g.add(
        "vhdx-declared-vhd.vhd",
        &["image.declared_format_mismatch"],
        Some("vhd"),
        "declared vhd, content is vhdx",
    );
}
