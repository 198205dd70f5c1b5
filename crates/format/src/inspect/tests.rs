//! Unit tests with hand-built headers for every format.

use super::*;
use crate::DiskFormat;

fn put(b: &mut [u8], o: usize, v: &[u8]) {
    b[o..o + v.len()].copy_from_slice(v);
}

fn run(b: &[u8]) -> Inspection {
    inspect(&b.to_vec(), &InspectOptions::default()).expect("in-memory reads do not fail")
}

fn names(i: &Inspection) -> Vec<&'static str> {
    i.violation_names()
}

// ---------------------------------------------------------------------------------------- qcow2

/// Minimal qcow2 v3: header, refcount table, refcount block, L1 (one cluster each).
fn qcow2(size: u64, bits: u32) -> Vec<u8> {
    let cs = 1usize << bits;
    let l1 = size.div_ceil((cs as u64 / 8) * cs as u64);
    let mut b = vec![0u8; cs * 4];
    put(&mut b, 0, b"QFI\xfb");
    put(&mut b, 4, &3u32.to_be_bytes());
    put(&mut b, 20, &bits.to_be_bytes());
    put(&mut b, 24, &size.to_be_bytes());
    put(&mut b, 36, &(l1 as u32).to_be_bytes());
    put(&mut b, 40, &(3 * cs as u64).to_be_bytes());
    put(&mut b, 48, &(cs as u64).to_be_bytes());
    put(&mut b, 56, &1u32.to_be_bytes());
    put(&mut b, 96, &4u32.to_be_bytes());
    put(&mut b, 100, &104u32.to_be_bytes());
    b
}

#[test]
fn qcow2_minimal_is_safe() {
    let i = run(&qcow2(1 << 30, 16));
    assert_eq!(i.format, DiskFormat::Qcow2);
    assert_eq!(i.virtual_size, 1 << 30);
    assert_eq!(i.cluster_size, Some(65536));
    assert!(i.is_safe(), "{:?}", i.violations);
    assert_eq!(i.allocated_size, 0);
    let Details::Qcow2(h) = &i.details else {
        panic!()
    };
    assert_eq!(h.version, 3);
    assert_eq!(h.l2_entries(), 8192);
}

#[test]
fn qcow2_v2_header_has_no_feature_fields() {
    let mut b = qcow2(1 << 20, 16);
    put(&mut b, 4, &2u32.to_be_bytes());
    // In v2 the extensions start at 72: bytes where v3 keeps feature bits are an extension.
    put(&mut b, 72, &1u32.to_be_bytes());
    put(&mut b, 76, &24u32.to_be_bytes());
    put(&mut b, 80, &[0xff; 24]);
    put(&mut b, 104, &0u64.to_be_bytes());
    let i = run(&b);
    assert!(i.is_safe(), "{:?}", i.violations);
    assert!(i.features.contains(&"compat=0.10".to_string()));
}

#[test]
fn qcow2_header_checks() {
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Patch, &str)> = vec![
        (
            Box::new(|b| put(b, 8, &512u64.to_be_bytes())),
            "qcow2.backing_file",
        ),
        (
            Box::new(|b| put(b, 72, &4u64.to_be_bytes())),
            "qcow2.data_file",
        ),
        (
            Box::new(|b| put(b, 88, &2u64.to_be_bytes())),
            "qcow2.data_file",
        ),
        (
            Box::new(|b| put(b, 72, &0x20u64.to_be_bytes())),
            "qcow2.unknown_incompatible_features",
        ),
        (
            Box::new(|b| put(b, 72, &2u64.to_be_bytes())),
            "qcow2.corrupt",
        ),
        (
            Box::new(|b| put(b, 32, &2u32.to_be_bytes())),
            "qcow2.encrypted",
        ),
        (
            Box::new(|b| put(b, 20, &22u32.to_be_bytes())),
            "qcow2.bad_cluster_bits",
        ),
        (
            Box::new(|b| put(b, 100, &108u32.to_be_bytes())),
            "qcow2.bad_header_length",
        ),
        (
            Box::new(|b| put(b, 4, &1000u32.to_be_bytes())),
            "qcow2.unsupported_version",
        ),
        (
            Box::new(|b| put(b, 40, &12345u64.to_be_bytes())),
            "qcow2.table_unaligned",
        ),
        (
            Box::new(|b| put(b, 40, &(1u64 << 40).to_be_bytes())),
            "qcow2.table_out_of_bounds",
        ),
        (
            Box::new(|b| put(b, 56, &0u32.to_be_bytes())),
            "qcow2.table_out_of_bounds",
        ),
        (
            Box::new(|b| put(b, 56, &1000u32.to_be_bytes())),
            "qcow2.table_too_large",
        ),
        (
            Box::new(|b| put(b, 36, &0u32.to_be_bytes())),
            "qcow2.l1_too_small",
        ),
        (
            Box::new(|b| put(b, 60, &1u32.to_be_bytes())),
            "qcow2.snapshots",
        ),
        (
            Box::new(|b| put(b, 96, &7u32.to_be_bytes())),
            "image.invalid_header",
        ),
        (Box::new(|b| b.truncate(80)), "image.truncated"),
        (
            Box::new(|b| put(b, 24, &(1u64 << 41).to_be_bytes())),
            "image.virtual_size_too_large",
        ),
    ];
    for (patch, want) in cases {
        let mut b = qcow2(1 << 30, 16);
        patch(&mut b);
        let i = run(&b);
        assert!(
            names(&i).contains(&want),
            "want {want}, got {:?}",
            names(&i)
        );
    }
}

#[test]
fn qcow2_extensions_are_parsed() {
    let mut b = qcow2(1 << 20, 16);
    let mut o = 104;
    let mut ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
        put(b, o, &ty.to_be_bytes());
        put(b, o + 4, &(data.len() as u32).to_be_bytes());
        put(b, o + 8, data);
        o += 8 + data.len().next_multiple_of(8);
    };
    ext(&mut b, qcow2::EXT_BACKING_FORMAT, b"raw");
    let mut ft = vec![0u8; 48];
    ft[0] = 0;
    ft[1] = 0;
    ft[2..7].copy_from_slice(b"dirty");
    ext(&mut b, qcow2::EXT_FEATURE_TABLE, &ft);
    let mut bm = vec![0u8; 24];
    bm[3] = 1;
    bm[8..16].copy_from_slice(&64u64.to_be_bytes());
    bm[16..24].copy_from_slice(&(3u64 * 65536).to_be_bytes());
    ext(&mut b, qcow2::EXT_BITMAPS, &bm);
    ext(&mut b, 0x1234, b"x");
    let i = run(&b);
    let Details::Qcow2(h) = &i.details else {
        panic!()
    };
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
    assert_eq!(h.feature_names[0].name, "dirty");
    assert_eq!(h.bitmaps.map(|x| x.nb_bitmaps), Some(1));
    assert_eq!(h.unknown_extensions, vec![0x1234]);
    assert!(i.features.contains(&"bitmaps".to_string()));
    assert!(i.is_safe(), "{:?}", i.violations);
    // Data file name extension.
    let mut b = qcow2(1 << 20, 16);
    put(&mut b, 104, &qcow2::EXT_DATA_FILE.to_be_bytes());
    put(&mut b, 108, &4u32.to_be_bytes());
    put(&mut b, 112, b"/dev");
    let i = run(&b);
    assert!(
        matches!(&i.violations[..], [Violation::Qcow2DataFile { name: Some(n) }] if n == "/dev")
    );
}

#[test]
fn qcow2_deep_walk_checks_l2_entries() {
    let cs = 65536u64;
    let mut b = qcow2(1 << 30, 16);
    b.resize(6 * cs as usize, 0);
    put(
        &mut b,
        3 * cs as usize,
        &((1u64 << 63) | (4 * cs)).to_be_bytes(),
    );
    put(
        &mut b,
        4 * cs as usize,
        &((1u64 << 63) | (5 * cs)).to_be_bytes(),
    );
    let i = run(&b);
    assert!(i.is_safe(), "{:?}", i.violations);
    assert_eq!(i.allocated_size, cs);
    // Compressed entry: offset 5*cs, 1 sector.
    let mut c = b.clone();
    put(
        &mut c,
        4 * cs as usize + 8,
        &((1u64 << 62) | (5 * cs + 100)).to_be_bytes(),
    );
    let i = run(&c);
    assert!(i.is_safe(), "{:?}", i.violations);
    assert!(i.features.contains(&"compressed-clusters".to_string()));
    let Details::Qcow2(h) = &i.details else {
        panic!()
    };
    assert_eq!(
        h.compressed_extent((1u64 << 62) | (3u64 << 54) | 1000),
        (1000, 4 * 512 - 1000 % 512)
    );
    // Out of range compressed.
    put(
        &mut c,
        4 * cs as usize + 8,
        &((1u64 << 62) | (1 << 40)).to_be_bytes(),
    );
    assert!(names(&run(&c)).contains(&"qcow2.compressed_cluster_out_of_bounds"));
    // Shallow mode does not walk.
    let shallow = inspect(
        &c,
        &InspectOptions {
            deep: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(shallow.is_safe());
}

#[test]
fn qcow_v1_and_luks_are_refused() {
    let mut b = vec![0u8; 4096];
    put(&mut b, 0, b"QFI\xfb\0\0\0\x01");
    put(&mut b, 24, &(1u64 << 20).to_be_bytes());
    b[32] = 12;
    let i = run(&b);
    assert_eq!(i.format, DiskFormat::Qcow);
    assert_eq!(names(&i), vec!["qcow.legacy_format"]);
    let mut l = vec![0u8; 4096];
    put(&mut l, 0, b"LUKS\xba\xbe\0\x01aes");
    let i = run(&l);
    assert_eq!(i.format, DiskFormat::Luks);
    assert!(names(&i).contains(&"luks.encrypted"));
}

// ------------------------------------------------------------------------------------------ vhd

fn vhd_footer(size: u64, disk_type: u32, data_offset: u64) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    put(&mut f, 0, b"conectix");
    put(&mut f, 8, &2u32.to_be_bytes());
    put(&mut f, 12, &0x10000u32.to_be_bytes());
    put(&mut f, 16, &data_offset.to_be_bytes());
    put(&mut f, 28, b"qem2");
    put(&mut f, 40, &size.to_be_bytes());
    put(&mut f, 48, &size.to_be_bytes());
    put(&mut f, 60, &disk_type.to_be_bytes());
    let ck = vhd::vhd_checksum(&f, 64);
    put(&mut f, 64, &ck.to_be_bytes());
    f
}

fn vhd_dynamic(size: u64) -> Vec<u8> {
    let bs = 2u64 << 20;
    let entries = size.div_ceil(bs) as u32;
    let footer = vhd_footer(size, 3, 512);
    let mut b = footer.clone();
    let mut d = vec![0u8; 1024];
    put(&mut d, 0, b"cxsparse");
    put(&mut d, 8, &u64::MAX.to_be_bytes());
    put(&mut d, 16, &1536u64.to_be_bytes());
    put(&mut d, 24, &0x10000u32.to_be_bytes());
    put(&mut d, 28, &entries.to_be_bytes());
    put(&mut d, 32, &(bs as u32).to_be_bytes());
    let ck = vhd::vhd_checksum(&d, 36);
    put(&mut d, 36, &ck.to_be_bytes());
    b.extend_from_slice(&d);
    let bat = vec![0xffu8; (entries as usize * 4).next_multiple_of(512)];
    b.extend_from_slice(&bat);
    b.extend_from_slice(&footer);
    b
}

#[test]
fn vhd_fixed_and_dynamic() {
    let mut fixed = vec![0u8; 1 << 20];
    fixed.extend_from_slice(&vhd_footer(1 << 20, 2, u64::MAX));
    let i = run(&fixed);
    assert_eq!(i.format, DiskFormat::Vhd);
    assert_eq!(i.virtual_size, 1 << 20);
    assert!(i.is_safe(), "{:?}", i.violations);
    let d = vhd_dynamic(64 << 20);
    let i = run(&d);
    assert_eq!(i.virtual_size, 64 << 20);
    assert!(i.is_safe(), "{:?}", i.violations);
    assert_eq!(detect(&d), DiskFormat::Vhd);
    let Details::Vhd(v) = &i.details else {
        panic!()
    };
    assert_eq!(v.dynamic.as_ref().map(|d| d.block_size), Some(2 << 20));
    // Fixed VHD with a size lie.
    let mut lie = vec![0u8; 1 << 20];
    lie.extend_from_slice(&vhd_footer(1 << 30, 2, u64::MAX));
    assert!(names(&run(&lie)).contains(&"vhd.size_mismatch"));
    // Bad checksum.
    let mut bad = fixed.clone();
    let n = bad.len();
    bad[n - 10] = 1;
    assert!(names(&run(&bad)).contains(&"vhd.bad_footer_checksum"));
    // Dynamic without its end footer.
    let mut t = d.clone();
    t.truncate(t.len() - 512);
    assert!(names(&run(&t)).contains(&"image.truncated"));
}

#[test]
fn vhd_chs_virtual_size_for_qemu_creator() {
    let mut f = vhd_footer(1 << 30, 2, u64::MAX);
    put(&mut f, 28, b"vpc ");
    put(&mut f, 56, &((100u32 << 16) | (16 << 8) | 63).to_be_bytes());
    let h = vhd::VhdFooter::parse(&f);
    assert_eq!(h.virtual_size(), 100 * 16 * 63 * 512);
}

// ----------------------------------------------------------------------------------------- vhdx

fn guid(s: &str) -> [u8; 16] {
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

/// Minimal VHDX: headers, region tables, metadata at 1 MiB, BAT at 2 MiB, no data.
pub(crate) fn vhdx(size: u64) -> Vec<u8> {
    let mut b = vec![0u8; 3 << 20];
    put(&mut b, 0, b"vhdxfile");
    for (i, off) in [64usize << 10, 128 << 10].into_iter().enumerate() {
        put(&mut b, off, b"head");
        put(&mut b, off + 8, &(i as u64 + 1).to_le_bytes());
        put(&mut b, off + 66, &1u16.to_le_bytes());
        put(&mut b, off + 68, &(1u32 << 20).to_le_bytes());
        put(&mut b, off + 72, &(1u64 << 20).to_le_bytes());
        let c = crc32c::crc32c(&b[off..off + 4096]);
        put(&mut b, off + 4, &c.to_le_bytes());
    }
    for off in [192usize << 10, 256 << 10] {
        put(&mut b, off, b"regi");
        put(&mut b, off + 8, &2u32.to_le_bytes());
        put(&mut b, off + 16, &guid(vhdx::BAT_GUID));
        put(&mut b, off + 32, &(2u64 << 20).to_le_bytes());
        put(&mut b, off + 40, &(1u32 << 20).to_le_bytes());
        put(&mut b, off + 44, &1u32.to_le_bytes());
        put(&mut b, off + 48, &guid(vhdx::METADATA_GUID));
        put(&mut b, off + 64, &(1u64 << 20).to_le_bytes());
        put(&mut b, off + 72, &(1u32 << 20).to_le_bytes());
        put(&mut b, off + 76, &1u32.to_le_bytes());
        let c = crc32c::crc32c(&b[off..off + (64 << 10)]);
        put(&mut b, off + 4, &c.to_le_bytes());
    }
    let m = 1usize << 20;
    put(&mut b, m, b"metadata");
    let items: [(&str, Vec<u8>); 4] = [
        (
            vhdx::FILE_PARAMETERS_GUID,
            [(32u32 << 20).to_le_bytes(), 0u32.to_le_bytes()].concat(),
        ),
        (vhdx::VIRTUAL_DISK_SIZE_GUID, size.to_le_bytes().to_vec()),
        (
            vhdx::LOGICAL_SECTOR_SIZE_GUID,
            512u32.to_le_bytes().to_vec(),
        ),
        (
            vhdx::PHYSICAL_SECTOR_SIZE_GUID,
            4096u32.to_le_bytes().to_vec(),
        ),
    ];
    put(&mut b, m + 10, &(items.len() as u16).to_le_bytes());
    for (i, (g, data)) in items.iter().enumerate() {
        let e = m + 32 + i * 32;
        let off = (64 << 10) + i * 64;
        put(&mut b, e, &guid(g));
        put(&mut b, e + 16, &(off as u32).to_le_bytes());
        put(&mut b, e + 20, &(data.len() as u32).to_le_bytes());
        put(&mut b, e + 24, &6u32.to_le_bytes());
        put(&mut b, m + off, data);
    }
    b
}

#[test]
fn vhdx_minimal_is_safe_and_checked() {
    let b = vhdx(1 << 30);
    let i = run(&b);
    assert_eq!(i.format, DiskFormat::Vhdx);
    assert_eq!(i.virtual_size, 1 << 30);
    assert_eq!(i.cluster_size, Some(32 << 20));
    assert!(i.is_safe(), "{:?}", i.violations);
    let Details::Vhdx(v) = &i.details else {
        panic!()
    };
    assert_eq!(v.current_header, Some(1));
    assert_eq!(v.bat_entries, 32);
    assert_eq!(v.metadata.logical_sector_size, 512);
    // A fully present block inside the file is fine; outside is not.
    let mut ok = b.clone();
    ok.resize(36 << 20, 0);
    put(&mut ok, 2 << 20, &((3u64 << 20) | 6).to_le_bytes());
    let i = run(&ok);
    assert!(i.is_safe(), "{:?}", i.violations);
    assert_eq!(i.allocated_size, 32 << 20);
    let mut bad = b.clone();
    put(&mut bad, 2 << 20, &((1u64 << 40) | 6).to_le_bytes());
    assert!(names(&run(&bad)).contains(&"vhdx.block_out_of_bounds"));
    // Too large a disk for the BAT region.
    let big = vhdx(1 << 50);
    assert!(names(&run(&big)).contains(&"vhdx.bat_too_small"));
    // Corrupt the newer header: the older one is used.
    let mut h = b.clone();
    h[(128 << 10) + 300] = 1;
    let i = run(&h);
    assert!(i.is_safe());
    let Details::Vhdx(v) = &i.details else {
        panic!()
    };
    assert_eq!(v.current_header, Some(0));
}

// ----------------------------------------------------------------------------------------- vmdk

#[test]
fn vmdk_probe_and_descriptor() {
    assert!(vmdk::probe(b"# Disk DescriptorFile\nversion=1\n"));
    assert!(vmdk::probe(b"# c\n   \r\nversion=3\r\n"));
    assert!(!vmdk::probe(b"hello world\nversion=1\n"));
    assert!(!vmdk::probe(b"version=4\n"));
    let d = vmdk::Descriptor::parse(
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\nRW 2048 SPARSE \"a.vmdk\"\nRW 10 FLAT \"b\" 5\nRDONLY 7 ZERO\nddb.adapterType = \"ide\"\n\0garbage",
    )
    .unwrap();
    assert_eq!(d.create_type.as_deref(), Some("streamOptimized"));
    assert_eq!(d.extents.len(), 3);
    assert_eq!(d.extents[1].offset, Some(5));
    assert_eq!(d.extents[2].file, None);
    assert_eq!(d.ddb_lines, 1);
    assert!(vmdk::Descriptor::parse(b"RW x SPARSE \"a\"").is_err());
    assert!(vmdk::Descriptor::parse(b"RW 1 SPARSE \"a").is_err());
    assert!(vmdk::Descriptor::parse("createType=\"é\"".as_bytes()).is_err());
    assert!(vmdk::Descriptor::parse(b"some junk").is_err());
}

/// Minimal monolithicSparse: header, descriptor at sector 1, GD at sector 21, GT at 22.
fn vmdk_sparse(capacity_sectors: u64, desc: &str) -> Vec<u8> {
    let mut b = vec![0u8; 512 * 26];
    put(&mut b, 0, b"KDMV");
    put(&mut b, 4, &1u32.to_le_bytes());
    put(&mut b, 8, &3u32.to_le_bytes());
    put(&mut b, 12, &capacity_sectors.to_le_bytes());
    put(&mut b, 20, &128u64.to_le_bytes());
    put(&mut b, 28, &1u64.to_le_bytes());
    put(&mut b, 36, &20u64.to_le_bytes());
    put(&mut b, 44, &512u32.to_le_bytes());
    put(&mut b, 48, &21u64.to_le_bytes());
    put(&mut b, 56, &21u64.to_le_bytes());
    put(&mut b, 512, desc.as_bytes());
    put(&mut b, 21 * 512, &22u32.to_le_bytes());
    b
}

#[test]
fn vmdk_sparse_checks() {
    let good = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"x.vmdk\"\n";
    let b = vmdk_sparse(2048, good);
    let i = run(&b);
    assert_eq!(i.format, DiskFormat::Vmdk);
    assert_eq!(i.virtual_size, 2048 * 512);
    assert!(i.is_safe(), "{:?}", i.violations);
    let mut g = b.clone();
    put(&mut g, 22 * 512, &30u32.to_le_bytes());
    assert!(names(&run(&g)).contains(&"vmdk.grain_out_of_bounds"));
    for (desc, want) in [
        (
            good.replace("SPARSE \"x.vmdk\"", "FLAT \"/dev/sda\" 0"),
            "vmdk.external_extent",
        ),
        (good.replace("x.vmdk", "/dev/sda"), "vmdk.extent_path"),
        (good.replace("x.vmdk", "..\\\\x"), "vmdk.extent_path"),
        (
            good.replace("monolithicSparse", "monolithicFlat"),
            "vmdk.unsupported_create_type",
        ),
        (
            good.replace("parentCID=ffffffff", "parentCID=00000001"),
            "vmdk.parent",
        ),
        (
            good.replace("createType", "create Type"),
            "vmdk.invalid_descriptor",
        ),
        (
            format!("{good}RW 1 SPARSE \"y.vmdk\"\n"),
            "vmdk.extent_count",
        ),
    ] {
        assert!(
            names(&run(&vmdk_sparse(2048, &desc))).contains(&want),
            "{want}: {desc}"
        );
    }
}

// ------------------------------------------------------------------------------------- qed, vdi

fn qed(size: u64) -> Vec<u8> {
    let cs = 65536usize;
    let mut b = vec![0u8; cs * 6];
    put(&mut b, 0, b"QED\0");
    put(&mut b, 4, &(cs as u32).to_le_bytes());
    put(&mut b, 8, &4u32.to_le_bytes());
    put(&mut b, 12, &1u32.to_le_bytes());
    put(&mut b, 40, &(cs as u64).to_le_bytes());
    put(&mut b, 48, &size.to_le_bytes());
    b
}

#[test]
fn qed_checks() {
    let b = qed(1 << 30);
    let i = run(&b);
    assert_eq!(i.format, DiskFormat::Qed);
    assert!(i.is_safe(), "{:?}", i.violations);
    let mut x = b.clone();
    put(&mut x, 16, &1u64.to_le_bytes());
    assert!(names(&run(&x)).contains(&"qed.backing_file"));
    let mut x = b.clone();
    put(&mut x, 65536, &(1u64 << 40).to_le_bytes());
    assert!(names(&run(&x)).contains(&"qed.table_out_of_bounds"));
}

fn vdi(size: u64) -> Vec<u8> {
    let blocks = size.div_ceil(1 << 20) as u32;
    let mut b = vec![0u8; 0x200 + 512];
    put(&mut b, 0, b"<<< Oracle VM VirtualBox Disk Image >>>\n");
    put(&mut b, 0x40, &vdi::MAGIC.to_le_bytes());
    put(&mut b, 0x44, &vdi::VERSION_1_1.to_le_bytes());
    put(&mut b, 0x48, &0x190u32.to_le_bytes());
    put(&mut b, 0x4c, &1u32.to_le_bytes());
    put(&mut b, 0x154, &0x200u32.to_le_bytes());
    put(&mut b, 0x158, &0x400u32.to_le_bytes());
    put(&mut b, 0x168, &512u32.to_le_bytes());
    put(&mut b, 0x170, &size.to_le_bytes());
    put(&mut b, 0x178, &(1u32 << 20).to_le_bytes());
    put(&mut b, 0x180, &blocks.to_le_bytes());
    for i in 0..blocks as usize {
        put(&mut b, 0x200 + i * 4, &u32::MAX.to_le_bytes());
    }
    b
}

#[test]
fn vdi_checks() {
    let b = vdi(64 << 20);
    let i = run(&b);
    assert_eq!(i.format, DiskFormat::Vdi);
    assert_eq!(i.virtual_size, 64 << 20);
    assert!(i.is_safe(), "{:?}", i.violations);
    let mut x = b.clone();
    put(&mut x, 0x200, &0u32.to_le_bytes());
    assert!(names(&run(&x)).contains(&"vdi.block_out_of_bounds"));
    let mut x = b.clone();
    put(&mut x, 0x4c, &4u32.to_le_bytes());
    assert!(names(&run(&x)).contains(&"vdi.differencing"));
}

// ----------------------------------------------------------------------------- iso, raw, misc

fn iso(size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b[0x8000] = 1;
    put(&mut b, 0x8001, b"CD001\x01");
    put(&mut b, 0x8000 + 80, &((size / 2048) as u32).to_le_bytes());
    put(&mut b, 0x8000 + 128, &2048u16.to_le_bytes());
    b
}

#[test]
fn iso_and_confusion() {
    let b = iso(1 << 20);
    let i = run(&b);
    assert_eq!(i.format, DiskFormat::Iso);
    assert!(i.is_iso);
    assert_eq!(i.virtual_size, 1 << 20);
    assert!(i.is_safe(), "{:?}", i.violations);
    // Hybrid ISO with an MBR is fine.
    let mut h = b.clone();
    put(
        &mut h,
        446,
        &[0x80, 0, 1, 0, 0x17, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0],
    );
    put(&mut h, 510, &[0x55, 0xaa]);
    assert!(run(&h).is_safe());
    // ISO with a qcow2 header in its system area.
    let mut q = b.clone();
    put(&mut q, 0, &qcow2(1 << 20, 16)[..512]);
    let i = run(&q);
    assert!(
        names(&i).contains(&"image.multiple_formats"),
        "{:?}",
        names(&i)
    );
    assert_eq!(i.matched_formats, vec![DiskFormat::Qcow2, DiskFormat::Iso]);
    // Declared raw for an ISO is accepted; declared iso for raw is not.
    let o = InspectOptions {
        declared_format: Some(DiskFormat::Raw),
        ..Default::default()
    };
    assert!(inspect(&b, &o).unwrap().is_safe());
    let o = InspectOptions {
        declared_format: Some(DiskFormat::Iso),
        ..Default::default()
    };
    assert!(!inspect(&vec![0u8; 4096], &o).unwrap().is_safe());
    // Truncated ISO volume.
    let mut t = b.clone();
    put(&mut t, 0x8000 + 80, &100000u32.to_le_bytes());
    assert!(names(&run(&t)).contains(&"image.truncated"));
}

#[test]
fn raw_partition_tables_are_fine() {
    let mut b = vec![0u8; 1 << 20];
    put(
        &mut b,
        446,
        &[
            0, 0, 2, 0, 0xee, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0xff, 0x07, 0, 0,
        ],
    );
    put(&mut b, 510, &[0x55, 0xaa]);
    put(&mut b, 512, b"EFI PART");
    let i = run(&b);
    assert_eq!(i.format, DiskFormat::Raw);
    assert!(i.is_safe());
    assert_eq!(i.features, vec!["gpt".to_string()]);
    assert_eq!(raw::partition_table(&b), Some("gpt"));
    // FAT boot sector is not a partition table.
    let mut f = b.clone();
    f[0x10] = 2;
    f[0x15] = 0xf8;
    assert_eq!(raw::partition_table(&f), None);
    // Empty file: raw, zero size.
    assert_eq!(names(&run(&[])), vec!["image.virtual_size_zero"]);
}

#[test]
fn detect_sniffs_every_magic() {
    assert_eq!(detect(&qcow2(1 << 20, 16)), DiskFormat::Qcow2);
    assert_eq!(detect(&vhdx(1 << 20)), DiskFormat::Vhdx);
    assert_eq!(detect(&vmdk_sparse(8, "")), DiskFormat::Vmdk);
    assert_eq!(detect(&qed(1 << 20)), DiskFormat::Qed);
    assert_eq!(detect(&vdi(1 << 20)), DiskFormat::Vdi);
    assert_eq!(detect(&iso(1 << 16)), DiskFormat::Iso);
    assert_eq!(detect(b"LUKS\xba\xbe\0\x02"), DiskFormat::Luks);
    assert_eq!(detect(b""), DiskFormat::Raw);
    assert_eq!(detect(&[0u8; 100]), DiskFormat::Raw);
}

#[test]
fn violation_names_are_unique_and_serialisable() {
    let samples = [
        Violation::VirtualSizeZero,
        Violation::Qcow2BackingFile {
            name: Some("x".into()),
        },
        Violation::Qcow2DataFile { name: None },
        Violation::VmdkDescriptorOnly,
        Violation::VhdDifferencing,
        Violation::VhdxDifferencing,
        Violation::QedBackingFile,
        Violation::LuksEncrypted,
        Violation::QcowLegacy,
    ];
    let mut names: Vec<_> = samples.iter().map(|v| v.name()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), samples.len());
    let j = serde_json::to_value(&samples[1]).unwrap();
    assert_eq!(j["name"], "qcow2.backing_file");
    assert!(j["message"].as_str().unwrap().contains("backing file"));
    let i = run(&qcow2(1 << 20, 16));
    let j = serde_json::to_value(&i).unwrap();
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["details"]["kind"], "qcow2");
    assert!(i.ensure_safe().is_ok());
    let mut b = qcow2(1 << 20, 16);
    put(&mut b, 8, &512u64.to_be_bytes());
    let e = run(&b).ensure_safe().unwrap_err().to_string();
    assert!(e.contains("qcow2.backing_file"), "{e}");
}
